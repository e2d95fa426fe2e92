"""Reading relation files with O_DIRECT (drkit/fsutil.py): the same bytes as an ordinary read,
whatever the buffer, the file size or the filesystem."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from drkit.fsutil import open_direct, pread_cached, read_into


def _write(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def _read_all(path: Path, buffer: memoryview) -> bytes:
    out = bytearray()
    with open_direct(path) as stream:
        while n := read_into(stream, buffer):
            out += buffer[:n]
    return bytes(out)


def test_direct_read_gives_the_file_with_an_unaligned_tail(workdir: Path) -> None:
    path = workdir / "relation"
    data = _write(path, 3 * 1024 * 1024 + 100)  # EOF in the middle of a block
    assert _read_all(path, memoryview(mmap.mmap(-1, 1024 * 1024))) == data


def test_unaligned_buffer_falls_back_to_the_page_cache(workdir: Path) -> None:
    path = workdir / "relation"
    data = _write(path, 2 * 1024 * 1024)
    unaligned = memoryview(bytearray(1024 * 1024 + 1))[1:]  # O_DIRECT refuses this address
    assert _read_all(path, unaligned) == data


def test_pread_cached_sees_a_write_made_after_opening(workdir: Path) -> None:
    path = workdir / "relation"
    _write(path, 1024 * 1024)
    with open_direct(path) as stream:
        with path.open("r+b") as other:  # another process writing a page, through the cache
            other.seek(8192 * 3)
            other.write(b"new page")
        assert pread_cached(stream.fileno(), 8, 8192 * 3) == b"new page"
        assert stream.tell() == 0  # the direct descriptor's offset is untouched
