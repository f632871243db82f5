"""The framing both files of the store share: CRC-32-checked frames and a JSON header.

Every frame is its payload's length and CRC-32 (little-endian, 4 bytes each), then the payload.
A file starts with its magic and a header frame naming the ``FORMAT_VERSION``.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from typing import BinaryIO, Final

# 2: the records in the snapshot's buckets and the journal's puts are serialized Session
# messages; 1 held their JSON.
FORMAT_VERSION: Final = 2
_FRAME: Final = struct.Struct("<II")  # payload length, CRC-32 of the payload
# Larger than any frame written here (records are at most 64 KiB): a bigger length is garbage,
# and must not make the reader try to allocate it.
_MAX_FRAME: Final = 64 * 1024 * 1024


class Damaged(Exception):
    """A file does not parse."""


class OldFormat(Damaged):
    """A file is intact but of an earlier format, which this version does not read."""


def frame(payload: bytes) -> bytes:
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def read_frames(f: BinaryIO, offset: int) -> Iterator[tuple[int, bytes]]:
    """Yield (offset after the frame, payload); raise Damaged at the first frame that is not
    whole and intact. Reads as it goes: a snapshot is never held in memory twice."""
    while head := f.read(_FRAME.size):
        if len(head) < _FRAME.size:
            raise Damaged(f"truncated frame header at byte {offset}")
        length, crc = _FRAME.unpack(head)
        payload = f.read(length) if length <= _MAX_FRAME else b""
        if len(payload) != length or zlib.crc32(payload) != crc:
            raise Damaged(f"damaged frame at byte {offset}")
        offset += _FRAME.size + length
        yield offset, payload


def next_frame(frames: Iterator[tuple[int, bytes]]) -> bytes:
    for _, payload in frames:
        return payload
    raise Damaged("file ends before its header")


def header(fields: dict[str, object]) -> bytes:
    return json.dumps({"format": FORMAT_VERSION, **fields}, separators=(",", ":")).encode()


def parse_header(payload: bytes, required: tuple[str, ...]) -> dict[str, object]:
    try:
        fields = json.loads(payload)
    except (ValueError, RecursionError):
        raise Damaged("unreadable header") from None
    if not isinstance(fields, dict):
        raise Damaged(f"unknown format {fields!r:.100}")
    version = fields.get("format")
    if type(version) is int and 0 < version < FORMAT_VERSION:
        raise OldFormat(f"format {version}, not {FORMAT_VERSION}")
    if version != FORMAT_VERSION:
        raise Damaged(f"unknown format {fields!r:.100}")
    missing = [name for name in required if name not in fields]
    if missing:
        raise Damaged(f"header lacks {missing}")
    return fields


def header_int(fields: dict[str, object], name: str) -> int:
    value = fields.get(name)
    if type(value) is not int or value < 0:
        raise Damaged(f"header {name} is not a count")
    return value
