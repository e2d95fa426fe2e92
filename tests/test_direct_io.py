"""Reading relation files with O_DIRECT, and restoring chunks with it (drkit/fsutil.py): the
same bytes as an ordinary read or write, whatever the buffer, the file size or the filesystem."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from rig.drkit import Drkit
from rig.postgres import PgCluster

from drkit.fsutil import open_direct, pread_cached, read_into, write_direct


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


def test_direct_write_puts_the_exact_bytes_and_leaves_an_unaligned_tail_to_the_cache(
    workdir: Path,
) -> None:
    path = workdir / "restored"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        aligned = mmap.mmap(-1, 3 * 1024 * 1024, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        first = os.urandom(2 * 1024 * 1024 + 100)  # a file's last chunk: ends mid-block
        aligned[: len(first)] = first
        assert write_direct(fd, memoryview(aligned)[: len(first)], 1024 * 1024) == 100
        # memory O_DIRECT refuses (unaligned, or read-only bytes): all through the page cache
        second = os.urandom(8192)
        assert write_direct(fd, memoryview(bytearray(b"x" + second))[1:], 0) == len(second)
        assert write_direct(fd, memoryview(second[:100]), 8192) == 100
    finally:
        os.close(fd)
    assert path.read_bytes() == second + second[:100] + bytes(1024 * 1024 - 8292) + first


def test_backups_read_with_and_without_direct_io_store_the_same_files(
    pg: PgCluster, workdir: Path
) -> None:
    from drkit.config.settings import load_settings
    from drkit.repo.open import open_repository

    pg.run_bin("pgbench", "-i", "-s", "1", "-q")
    pg.psql("VACUUM ANALYZE")
    pg.psql("CHECKPOINT")
    sums = []
    for direct in (True, False):
        (workdir / f"direct-{direct}").mkdir()
        dk = Drkit(pg, workdir / f"direct-{direct}", backup={"direct_io": direct})
        dk.ok("init")
        dk.ok("backup")
        repo = open_repository(load_settings(dk.config))
        manifest, _ = repo.load_manifest(repo.backups()[-1])
        sums.append({f.path: f.sha256 for f in manifest.files if f.size >= 1024 * 1024})
    big = [path for path in sums[0] if path.startswith("base/")]
    assert big, "no relation file of 1 MiB or more"
    assert {p: sums[0][p] for p in big} == {p: sums[1][p] for p in big}
