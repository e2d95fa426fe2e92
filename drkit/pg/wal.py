"""WAL names and positions: LSNs, segment numbers, segment file names, segment headers."""

from __future__ import annotations

import re
import struct

_SEGMENT_NAME = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
_LONG_HEADER = struct.Struct("<HHIQIxxxxQII")  # XLogLongPageHeaderData


def parse_lsn(text: str) -> int:
    """'16/B374D848' -> integer byte position."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def segment_name(timeline: int, segno: int, segment_size: int) -> str:
    per_xlogid = 0x100000000 // segment_size
    return f"{timeline:08X}{segno // per_xlogid:08X}{segno % per_xlogid:08X}"


def parse_segment_name(name: str, segment_size: int) -> tuple[int, int]:
    """'000000010000000A00000003' -> (timeline, segno)."""
    match = _SEGMENT_NAME.match(name)
    if match is None:
        raise ValueError(f"'{name}' is not a WAL segment name")
    per_xlogid = 0x100000000 // segment_size
    return int(match.group(1), 16), int(match.group(2), 16) * per_xlogid + int(match.group(3), 16)


def segments_between(timeline: int, start_lsn: int, stop_lsn: int, segment_size: int) -> list[str]:
    """Segment names holding WAL from start_lsn up to (not including) stop_lsn, on one timeline.

    stop_lsn is the end of the last record needed, so its last byte is at stop_lsn - 1.
    """
    first = start_lsn // segment_size
    last = max(stop_lsn - 1, start_lsn) // segment_size
    return [segment_name(timeline, segno, segment_size) for segno in range(first, last + 1)]


def check_segment_header(data: bytes, segno: int, segment_size: int, system_identifier: int) -> str:
    """Return '' when ``data`` starts like segment ``segno`` of this cluster, else the reason."""
    if len(data) < _LONG_HEADER.size:
        return "shorter than a WAL page header"
    _magic, _info, _tli, pageaddr, _rem, sysid, seg_size, _blcksz = _LONG_HEADER.unpack_from(data)
    if pageaddr != segno * segment_size:
        return f"holds WAL of position {format_lsn(pageaddr)} (a recycled segment)"
    if sysid != system_identifier:
        return f"belongs to database system {sysid}, not {system_identifier}"
    if seg_size != segment_size:
        return f"has segment size {seg_size}, expected {segment_size}"
    return ""
