"""The journal file, ``sessions.journal``: the changes applied since its snapshot.

``SessionStore.flush()`` appends a batch of PUT / DELETE frames and a COMMIT frame with the
revision, then one fdatasync. Only committed batches count on load, so a batch torn by a crash
is dropped whole. It names its snapshot's generation; a journal of another generation (a crash
between writing a snapshot and starting its journal) is ignored.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from sidecar.sessions.frames import Damaged, frame, header, next_frame, parse_header, read_frames
from sidecar.sessions.table import RecordTable, StoredRecord

JOURNAL_NAME: Final = "sessions.journal"
_JOURNAL_MAGIC: Final = b"VSMJRNL1"
_REVISION: Final = struct.Struct("<q")
_ID_LENGTH: Final = struct.Struct("<H")
_COMMIT: Final = struct.Struct("<qd")  # revision, wall time of the last apply (NaN: none)
# Journal changes are gathered and applied this many at a time: each bucket they touch is
# re-packed once per chunk rather than once per change, while the raw JSON held meanwhile stays
# a few MB (a whole journal's would be as large as the snapshot again).
_REPLAY_CHUNK: Final = 4096
_PUT: Final = b"P"
_DELETE: Final = b"D"
_COMMIT_OP: Final = b"C"


@dataclass(frozen=True, slots=True)
class Batch:
    """Journal frames to append, ending with a COMMIT at ``revision``."""

    frames: list[bytes]
    revision: int


@dataclass(frozen=True, slots=True)
class Replayed:
    """How far a journal was replayed: its committed part ends at byte ``end`` of ``size``."""

    end: int
    size: int
    revision: int
    applied_at: float | None


def journal_header(generation: str) -> bytes:
    """The start of a new journal for the snapshot of ``generation``."""
    return _JOURNAL_MAGIC + frame(header({"generation": generation}))


def put_frame(session_id: str, revision: int, raw: bytes) -> bytes:
    return frame(_put_payload(session_id, revision, raw))


def delete_frame(session_id: str, revision: int) -> bytes:
    return frame(_DELETE + _REVISION.pack(revision) + session_id.encode())


def commit_frame(revision: int, applied_at: float | None) -> bytes:
    when = math.nan if applied_at is None else applied_at
    return frame(_COMMIT_OP + _COMMIT.pack(revision, when))


def read_journal(
    path: Path, generation: str, table: RecordTable, revision: int, applied_at: float | None
) -> Replayed | None:
    """Replay into ``table`` the committed batches of the journal at ``path``, which starts from
    ``revision`` and ``applied_at``; None when there is no journal of ``generation``.

    Raises Damaged when the journal's start does not parse; a torn end is left out of ``end``.
    """
    if not path.exists():
        return None
    with open(path, "rb", buffering=1024 * 1024) as f:
        if f.read(len(_JOURNAL_MAGIC)) != _JOURNAL_MAGIC:
            raise Damaged(f"{path} is not a session journal")
        frames = read_frames(f, len(_JOURNAL_MAGIC))
        fields = parse_header(next_frame(frames), ("generation",))
        if fields["generation"] != generation:
            return None  # written before the snapshot, which therefore holds all of it
        end, revision, applied_at = _replay(frames, f.tell(), table, revision, applied_at)
    return Replayed(end, path.stat().st_size, revision, applied_at)


def _replay(
    frames: Iterator[tuple[int, bytes]],
    start: int,
    table: RecordTable,
    revision: int,
    applied_at: float | None,
) -> tuple[int, int, float | None]:
    """Apply every committed batch; return the offset where the last one ends, and its
    revision and time of apply."""
    changes: dict[str, StoredRecord | None] = {}
    batch: list[bytes] = []
    end = start
    try:
        for offset, payload in frames:
            if payload[:1] != _COMMIT_OP:
                batch.append(payload)
                continue
            # Parse the whole batch before taking any of it: a batch counts whole or not.
            commit = _parse_commit(payload)
            parsed = [_parse_change(entry) for entry in batch]
            changes.update(parsed)
            revision, applied_at = commit
            batch, end = [], offset
            if len(changes) >= _REPLAY_CHUNK:
                table.update(changes)
                changes.clear()
    except Damaged:
        pass  # a torn end: whatever follows the last COMMIT is dropped
    table.update(changes)
    return end, revision, applied_at


def _put_payload(session_id: str, revision: int, raw: bytes) -> bytes:
    key = session_id.encode()
    return _PUT + _REVISION.pack(revision) + _ID_LENGTH.pack(len(key)) + key + raw


def _parse_change(payload: bytes) -> tuple[str, StoredRecord | None]:
    """A journal entry as (session id, record), or (session id, None) for a delete."""
    head = 1 + _REVISION.size
    if len(payload) <= head or payload[:1] not in (_PUT, _DELETE):
        raise Damaged(f"malformed journal entry {payload[:1]!r}")
    (revision,) = _REVISION.unpack_from(payload, 1)
    try:
        if payload[:1] == _DELETE:
            return payload[head:].decode(), None
        (length,) = _ID_LENGTH.unpack_from(payload, head)
        start = head + _ID_LENGTH.size
        session_id = payload[start : start + length].decode()
    except (UnicodeDecodeError, struct.error):
        raise Damaged("malformed journal entry") from None
    return session_id, StoredRecord(revision, payload[start + length :])


def _parse_commit(payload: bytes) -> tuple[int, float | None]:
    if len(payload) != 1 + _COMMIT.size:
        raise Damaged("malformed commit entry")
    revision, applied_at = _COMMIT.unpack_from(payload, 1)
    return revision, None if math.isnan(applied_at) else applied_at
