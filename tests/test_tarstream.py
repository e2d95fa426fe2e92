"""The reader of a base backup's tar archives: what PostgreSQL writes is read member by member,
in pieces of any size, and a stream that lost its place is refused, not misread."""

from __future__ import annotations

import io
import tarfile

import pytest

from drkit.errors import PostgresError
from drkit.pg.tarstream import TarStream


class Pieces:
    """An archive's bytes in pieces of ``size``, as replication messages deliver them."""

    def __init__(self, data: bytes, size: int) -> None:
        self._data = io.BytesIO(data)
        self._size = size

    def readinto(self, buffer: memoryview, /) -> int:
        return self._data.readinto(buffer[: self._size])


def ustar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return out.getvalue()


def member(
    name: str, kind: bytes, data: bytes = b"", link: str = ""
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode, info.mtime, info.linkname = (
        kind,
        len(data),
        0o600,
        1700000000,
        link,
    )
    info.uname = info.gname = "postgres"
    return info, data


@pytest.mark.parametrize("piece", [1, 700, 1 << 20])
def test_members_are_read_whole_whatever_the_pieces(piece: int) -> None:
    big = bytes(range(256)) * 5000  # not a multiple of the 512-byte block
    archive = ustar(
        [
            member("base/", tarfile.DIRTYPE),
            member("base/1/1259", tarfile.REGTYPE, big),
            member("pg_tblspc/16385/", tarfile.SYMTYPE, link="/srv/ts"),
            member("PG_VERSION", tarfile.REGTYPE, b"18\n"),
        ]
    )
    tar = TarStream(Pieces(archive, piece), "base.tar")
    seen = []
    for m in tar:
        if m.name == "base/1/1259":
            buffer = memoryview(bytearray(3000))
            got = bytearray()
            while n := tar.readinto(buffer):
                got += buffer[:n]
            seen.append((m.name, bytes(got) == big, m.mode, m.mtime, m.uname))
        elif m.name == "PG_VERSION":
            seen.append((m.name, tar.read(), m.mode, m.mtime, m.uname))
        else:
            seen.append((m.name, m.isdir(), m.issym(), m.linkname))
    assert seen == [
        ("base/", True, False, ""),
        ("base/1/1259", True, 0o600, 1700000000, "postgres"),
        ("pg_tblspc/16385/", False, True, "/srv/ts"),
        ("PG_VERSION", b"18\n", 0o600, 1700000000, "postgres"),
    ]


def test_a_damaged_header_is_refused_with_the_archives_name() -> None:
    archive = bytearray(ustar([member("PG_VERSION", tarfile.REGTYPE, b"18\n")]))
    archive[0] ^= 0x20  # the name's first byte: the header's checksum no longer matches
    with pytest.raises(PostgresError, match=r"'base\.tar' holds a damaged tar header"):
        list(TarStream(Pieces(bytes(archive), 1 << 20), "base.tar"))


def test_an_archive_cut_inside_a_member_is_refused() -> None:
    archive = ustar([member("global/1262", tarfile.REGTYPE, bytes(8192))])
    tar = TarStream(Pieces(archive[:4096], 1 << 20), "base.tar")
    with pytest.raises(PostgresError, match=r"'base\.tar' ended inside a member"):
        for _ in tar:
            tar.read()
