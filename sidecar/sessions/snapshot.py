"""The snapshot file, ``sessions.snapshot``: every record at one revision.

Written whole to a temporary file, fsynced and renamed over the old one (then the directory is
fsynced), so a crash leaves the old or the new, never a mix. Carries a random *generation* id,
which its journal (:mod:`sidecar.sessions.journal`) names. Holds the table's buckets as they
are: a header frame, then one frame per non-empty bucket (its number, then the packed bucket).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from sidecar.sessions.frames import (
    Damaged,
    frame,
    header,
    header_int,
    next_frame,
    parse_header,
    read_frames,
)
from sidecar.sessions.table import COUNT, RecordTable

SNAPSHOT_NAME: Final = "sessions.snapshot"
_SNAPSHOT_MAGIC: Final = b"VSMSNAP1"
_INDEX: Final = struct.Struct("<I")  # a bucket's number, in the snapshot


@dataclass(frozen=True, slots=True)
class Image:
    """Everything a snapshot file holds, taken under the lock."""

    generation: str
    revision: int
    applied_at: float | None
    records: int
    buckets: list[bytes]


@dataclass(frozen=True, slots=True)
class LoadedSnapshot:
    """What a snapshot file holds, read back."""

    table: RecordTable
    revision: int
    applied_at: float | None
    generation: str


def read_snapshot(path: Path) -> LoadedSnapshot:
    """Read the snapshot at ``path``; raise Damaged when it does not parse whole."""
    with open(path, "rb", buffering=1024 * 1024) as f:
        if f.read(len(_SNAPSHOT_MAGIC)) != _SNAPSHOT_MAGIC:
            raise Damaged(f"{path} is not a session snapshot")
        frames = read_frames(f, len(_SNAPSHOT_MAGIC))
        fields = parse_header(next_frame(frames), ("generation", "revision", "records"))
        buckets = header_int(fields, "buckets")
        table = RecordTable(_read_buckets(frames, buckets))
    if len(table) != fields["records"]:
        raise Damaged(f"{path} holds {len(table)} records, not as announced")
    return LoadedSnapshot(
        table=table,
        revision=header_int(fields, "revision"),
        applied_at=_optional_float(fields.get("applied_at")),
        generation=str(fields["generation"]),
    )


def _optional_float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _read_buckets(frames: Iterator[tuple[int, bytes]], count: int) -> list[bytes]:
    if count <= 0 or count & (count - 1):
        raise Damaged(f"bucket count {count} is not a power of two")
    buckets = [b""] * count
    for _, payload in frames:
        if len(payload) <= _INDEX.size + COUNT.size:
            raise Damaged("bucket entry too short")
        (index,) = _INDEX.unpack_from(payload)
        if index >= count or buckets[index]:
            raise Damaged(f"bucket entry {index} out of place")
        buckets[index] = payload[_INDEX.size :]
    return buckets


def snapshot_pieces(image: Image) -> Iterator[bytes]:
    yield _SNAPSHOT_MAGIC
    fields = {
        "generation": image.generation,
        "revision": image.revision,
        "applied_at": image.applied_at,
        "records": image.records,
        "buckets": len(image.buckets),
    }
    yield frame(header(fields))
    for index, blob in enumerate(image.buckets):
        if blob:
            yield frame(_INDEX.pack(index) + blob)
