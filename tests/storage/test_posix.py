"""PosixStorage: the conformance suite, plus what only a local directory has (temp files, fsync,
modes, a full disk)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from drkit.errors import ObjectExists, StorageError
from drkit.storage.base import ObjectInfo
from drkit.storage.posix import TEMP_DIR, PosixStorage

from .conformance import StorageConformance, payload


class TestPosixConformance(StorageConformance):
    @pytest.fixture
    def storage(self, tmp_path: Path) -> PosixStorage:
        # A root that does not exist yet: the first write creates it.
        return PosixStorage(tmp_path / "repo", name="test-local")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "repo"


@pytest.fixture
def storage(root: Path) -> PosixStorage:
    return PosixStorage(root, name="test-local")


def temp_files(root: Path) -> list[str]:
    return sorted(os.listdir(root / TEMP_DIR)) if (root / TEMP_DIR).exists() else []


def test_nothing_is_created_before_the_first_write(root: Path, storage: PosixStorage) -> None:
    assert storage.list() == []
    assert not storage.exists("x")
    storage.delete("x")
    assert storage.cleanup_temp(0) == 0
    assert not root.exists()
    storage.write_bytes("x", b"1")
    assert (root / "x").read_bytes() == b"1"


def test_objects_are_read_only_files(root: Path, storage: PosixStorage) -> None:
    storage.write_bytes("a/b/c", b"data")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(root / "a/b/c").st_mode) == 0o440
    assert stat.S_IMODE(os.stat(root / "a/b").st_mode) == 0o750 & ~umask
    assert stat.S_IMODE(os.stat(root / "a").st_mode) == 0o750 & ~umask


def test_temp_area_is_never_listed_and_reserved(root: Path, storage: PosixStorage) -> None:
    writer = storage.open_write("pending")
    writer.write(b"x" * 100)
    assert len(temp_files(root)) == 1
    assert storage.list() == []
    assert storage.list(".t") == []
    assert storage.list(f"{TEMP_DIR}/") == []
    for method in (storage.open_write, storage.stat, storage.delete, storage.open_read):
        with pytest.raises(ValueError, match="reserved"):
            method(f"{TEMP_DIR}/x")
    writer.abort()
    assert temp_files(root) == []
    storage.write_bytes(".tmpfoo/x", b"a name that only starts like the temp area")
    assert [info.key for info in storage.list()] == [".tmpfoo/x"]


KILLED_WRITER = """
import sys, time
from pathlib import Path
from drkit.storage.posix import PosixStorage

writer = PosixStorage(Path(sys.argv[1])).open_write("backup/killed")
writer.write(b"x" * 1_000_000)
print("ready", flush=True)
time.sleep(60)
"""


def test_killed_writer_leaves_only_a_temp_file(root: Path, storage: PosixStorage) -> None:
    repo_dir = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo_dir)}
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILLED_WRITER), str(root)],
        stdout=subprocess.PIPE,
        env=env,
    ) as child:
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        child.kill()
        child.wait()

    assert len(temp_files(root)) == 1
    assert storage.list() == []
    assert not storage.exists("backup/killed")
    assert storage.cleanup_temp(older_than_s=3600) == 0  # too young: may be a live writer
    assert len(temp_files(root)) == 1
    assert storage.cleanup_temp(older_than_s=0) == 1
    assert temp_files(root) == []
    storage.write_bytes("backup/killed", b"rerun succeeds")
    assert storage.read_bytes("backup/killed") == b"rerun succeeds"


def test_cleanup_after_a_crash_between_link_and_unlink_keeps_the_object(
    root: Path, storage: PosixStorage
) -> None:
    storage.write_bytes("obj", b"published")
    os.link(root / "obj", root / TEMP_DIR / "write-crashed.tmp")
    assert storage.cleanup_temp(0) == 1
    assert storage.read_bytes("obj") == b"published"


def test_commit_fsyncs_the_file_and_every_new_directory(
    root: Path, storage: PosixStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    writer = storage.open_write("a/b/c")
    writer.write(b"data")
    temp_path = str(root / TEMP_DIR / temp_files(root)[0])
    synced.clear()
    writer.commit()
    assert synced[0] == temp_path  # the data first, then the names
    assert set(synced[1:]) == {str(root), str(root / "a"), str(root / "a/b")}

    synced.clear()
    storage.delete("a/b/c")
    assert synced == [str(root / "a/b")]


def test_delete_removes_empty_directories(root: Path, storage: PosixStorage) -> None:
    storage.write_bytes("a/b/c", b"1")
    storage.write_bytes("a/x", b"2")
    storage.delete("a/b/c")
    assert not (root / "a/b").exists()
    assert (root / "a/x").exists()
    storage.delete("a/x")
    assert sorted(os.listdir(root)) == [TEMP_DIR]


def test_object_and_directory_cannot_share_a_name(root: Path, storage: PosixStorage) -> None:
    storage.write_bytes("a", b"object")
    with pytest.raises(StorageError, match="in the way") as info:
        storage.write_bytes("a/b", b"below an object")
    assert not isinstance(info.value, ObjectExists)
    storage.write_bytes("d/e", b"object")
    with pytest.raises(StorageError, match="in the way"):
        storage.write_bytes("d", b"named like a directory")
    assert [i.key for i in storage.list()] == ["a", "d/e"]
    assert temp_files(root) == []


def test_foreign_entries_are_not_listed(root: Path, storage: PosixStorage) -> None:
    storage.write_bytes("real", b"1")
    (root / "back\\slash").write_bytes(b"not a drkit key")
    (root / "link").symlink_to(root / "real")
    os.mkfifo(root / "fifo")
    storage.write_bytes("dir/inside", b"22")
    (root / "dirlink").symlink_to(root / "dir")  # never followed: its objects are listed once
    odd = os.fsencode(root) + b"/\xff-not-utf8"
    os.mkdir(odd)
    Path(os.fsdecode(odd + b"/file")).write_bytes(b"not a drkit key either")
    assert storage.list() == [ObjectInfo("dir/inside", 2), ObjectInfo("real", 1)]
    assert storage.list("dir") == [ObjectInfo("dir/inside", 2)]
    assert storage.list_keys() == ["dir/inside", "real"]  # the same keys, without sizes
    assert storage.list_keys("di") == ["dir/inside"] and storage.list_keys(".tmp/") == []


def test_permission_error_names_the_path(
    root: Path, storage: PosixStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tests run as root, which no file mode stops: fail the syscall instead.
    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    writer = storage.open_write("obj")
    writer.write(b"x")
    monkeypatch.setattr(os, "link", denied)
    with pytest.raises(StorageError) as info:
        writer.commit()
    assert (
        str(info.value) == f"permission denied writing '{root / 'obj'}' in repository 'test-local'"
    )
    assert info.value.hint is not None and str(root) in info.value.hint
    monkeypatch.undo()
    assert storage.list() == []
    assert temp_files(root) == []


@pytest.mark.parametrize("code", [errno.EPERM, errno.EOPNOTSUPP])
def test_filesystem_without_hard_links(
    root: Path, storage: PosixStorage, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    writer = storage.open_write("obj")
    monkeypatch.setattr(os, "link", refuse)
    with pytest.raises(StorageError, match="refuses a hard link") as info:
        writer.commit()
    assert info.value.hint is not None and "hard links" in info.value.hint
    monkeypatch.undo()
    assert temp_files(root) == []


def test_other_io_errors_name_the_path(
    root: Path, storage: PosixStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage.write_bytes("obj", b"data")

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "stat", broken)
    with pytest.raises(StorageError) as info:
        storage.stat("obj")
    monkeypatch.undo()
    assert str(info.value) == (
        f"reading '{root / 'obj'}' in repository 'test-local' failed: input/output error"
    )


def test_no_space_from_the_filesystem_is_a_clear_error(
    root: Path, storage: PosixStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    writer = storage.open_write("backup/data")
    writer.write(b"x")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError) as info:
        writer.commit()
    monkeypatch.undo()
    assert str(info.value) == (
        "no space left on device writing 'backup/data' to repository 'test-local'"
    )
    assert storage.list() == []
    assert temp_files(root) == []


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a real full disk. Needs mount privileges (tests run as root)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_real_full_disk(small_filesystem: Path) -> None:
    root = small_filesystem / "repo"
    storage = PosixStorage(root, name="small")
    data = payload(2 * 1024 * 1024)
    with pytest.raises(StorageError) as info, storage.open_write("backup/big") as writer:
        for start in range(0, len(data), 65536):
            writer.write(data[start : start + 65536])
    assert str(info.value) == "no space left on device writing 'backup/big' to repository 'small'"
    assert info.value.hint
    assert storage.list() == []
    assert temp_files(root) == []
    # The aborted write gave its space back.
    storage.write_bytes("backup/small", payload(500_000))
    assert storage.stat("backup/small").size == 500_000
