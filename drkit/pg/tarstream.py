"""The tar archives of a base backup, read member by member as they stream in (remote mode).

PostgreSQL writes plain ustar headers (src/port/tar.c): names and link targets under 100 bytes,
sizes in octal or, past 8 GiB, base-256; directories and tablespace links with a trailing slash.
This reader takes exactly that, straight from the replication stream's messages: a member's
bytes are copied once, from the message into the caller's buffer, where the standard library's
``tarfile`` copied each byte five to seven times on the way (its read-ahead buffer, joins and
slices, a buffered reader on top). Each header's checksum is checked, so a stream that lost its
place is refused rather than misread.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from drkit.errors import PostgresError

BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")
_EXTENDED = (b"x", b"g", b"L", b"K")  # pax and GNU long-name headers: PostgreSQL writes none


class ArchiveBytes(Protocol):
    """An archive's bytes as they arrive: ``readinto`` fills at most ``len(buffer)`` bytes and
    returns how many (0 at the archive's end)."""

    def readinto(self, buffer: memoryview, /) -> int: ...


@dataclass(frozen=True)
class Member:
    name: str
    size: int
    mode: int
    mtime: int
    kind: bytes  # the ustar type flag
    linkname: str
    uname: str
    gname: str

    def isfile(self) -> bool:
        return self.kind in _REGULAR

    def isdir(self) -> bool:
        return self.kind == b"5"

    def issym(self) -> bool:
        return self.kind == b"2"


class TarStream:
    """Iterate over the members; read a member's bytes (``readinto``, ``read``) before asking for
    the next one (what is left unread of it is skipped)."""

    def __init__(self, source: ArchiveBytes, name: str) -> None:
        self._source = source
        self._name = name  # the archive's, for errors
        self._left = 0  # bytes of the current member not read yet
        self._padding = 0  # after them, to the next header
        self._header = memoryview(bytearray(BLOCK))

    def __iter__(self) -> Iterator[Member]:
        while (member := self._next()) is not None:
            yield member
        self._drain()  # PostgreSQL's end-of-archive blocks

    def readinto(self, buffer: memoryview, /) -> int:
        """Up to ``len(buffer)`` bytes of the current member (0 at its end)."""
        want = min(len(buffer), self._left)
        if not want:
            return 0
        n = self._source.readinto(buffer[:want])
        if not n:
            raise self._truncated()
        self._left -= n
        return n

    def read(self) -> bytes:
        """The rest of the current member."""
        data = bytearray(self._left)
        view = memoryview(data)
        filled = 0
        while filled < len(data):
            filled += self.readinto(view[filled:])
        return bytes(data)

    def _next(self) -> Member | None:
        self._skip(self._left + self._padding)
        self._left = self._padding = 0
        header = self._header
        if not self._fill(header):
            return None  # an archive without end-of-archive blocks
        if not any(header):
            return None
        member = self._parse(bytes(header))
        self._left = member.size
        self._padding = -member.size % BLOCK
        return member

    def _parse(self, h: bytes) -> Member:
        stored = _number(h[148:156])
        computed = sum(h[:148]) + sum(h[156:]) + 8 * ord(" ")
        if stored != computed:
            raise PostgresError(
                f"the server's archive '{self._name}' holds a damaged tar header"
                f" (checksum {stored}, computed {computed})"
            )
        kind = h[156:157]
        if kind in _EXTENDED:
            raise PostgresError(
                f"the server's archive '{self._name}' holds a tar header of type"
                f" '{kind.decode(errors='replace')}', which PostgreSQL does not write"
            )
        no_data = kind in (b"1", b"3", b"4", b"6")  # links and devices
        size = 0 if no_data else _number(h[124:136])
        name = _text(h[0:100])
        if prefix := _text(h[345:500]):
            name = f"{prefix}/{name}"
        return Member(
            name=name,
            size=size,
            mode=_number(h[100:108]),
            mtime=_number(h[136:148]),
            kind=kind,
            linkname=_text(h[157:257]),
            uname=_text(h[265:297]),
            gname=_text(h[297:329]),
        )

    def _fill(self, buffer: memoryview) -> bool:
        """Fill ``buffer`` from the archive: False at its end before the first byte."""
        filled = 0
        while filled < len(buffer):
            n = self._source.readinto(buffer[filled:])
            if not n:
                if filled:
                    raise self._truncated()
                return False
            filled += n
        return True

    def _skip(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, 1 << 16))) if n else None
        while n:
            assert scratch is not None
            got = self._source.readinto(scratch[: min(n, len(scratch))])
            if not got:
                raise self._truncated()
            n -= got

    def _drain(self) -> None:
        scratch = memoryview(bytearray(BLOCK * 20))
        while self._source.readinto(scratch):
            pass

    def _truncated(self) -> PostgresError:
        return PostgresError(f"the server's archive '{self._name}' ended inside a member")


def _number(field: bytes) -> int:
    """A tar number: octal digits, or base-256 (high bit of the first byte set)."""
    if field[0] & 0x80:
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise PostgresError(f"the server's archive holds a tar header field '{digits!r}'") from None


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", errors="surrogateescape")
