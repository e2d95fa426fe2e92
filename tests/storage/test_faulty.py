"""FaultyStorage: transparent without faults, and each kind of fault does what it says."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from rig.faulty import FaultyStorage

from drkit.errors import ObjectExists, ObjectNotFound, StorageError
from drkit.storage import posix
from drkit.storage.posix import PosixStorage

from .conformance import StorageConformance, payload


class TestFaultyConformance(StorageConformance):
    """Without faults the wrapper is invisible."""

    @pytest.fixture
    def storage(self, tmp_path: Path) -> FaultyStorage:
        return FaultyStorage(PosixStorage(tmp_path / "repo", name="test-faulty"))


@pytest.fixture
def inner(tmp_path: Path) -> PosixStorage:
    return PosixStorage(tmp_path / "repo", name="test-local")


@pytest.fixture
def faulty(inner: PosixStorage) -> FaultyStorage:
    return FaultyStorage(inner)


def test_write_fault_passes_the_bytes_before_it(
    faulty: FaultyStorage, inner: PosixStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    reached_inner: list[int] = []
    real_write = posix._PosixWriter._write

    def record(self: posix._PosixWriter, data: bytes | memoryview) -> None:
        reached_inner.append(len(data))
        real_write(self, data)

    monkeypatch.setattr(posix._PosixWriter, "_write", record)
    faulty.add_fault("open_write.write", StorageError("disk on fire"), after_bytes=100)
    with pytest.raises(StorageError, match="disk on fire"), faulty.open_write("k") as writer:
        for _ in range(3):
            writer.write(b"x" * 60)
    assert reached_inner == [60, 40]
    assert inner.list() == []
    assert inner.cleanup_temp(0) == 0  # the abort removed the temporary file
    faulty.assert_all_fired()


def test_no_space_mid_write(faulty: FaultyStorage) -> None:
    faulty.add_no_space(after_bytes=1000)
    writer = faulty.open_write("backup/data")
    writer.write(payload(999))
    with pytest.raises(StorageError) as info:
        writer.write(payload(2))
    assert (
        str(info.value)
        == "no space left on device writing 'backup/data' to repository 'test-local'"
    )
    assert info.value.hint
    with pytest.raises(ValueError, match="aborted"):
        writer.commit()  # a write that failed can never be committed truncated
    assert faulty.list() == []
    faulty.assert_all_fired()


def test_fault_for_one_key_only(faulty: FaultyStorage) -> None:
    faulty.add_no_space(key="full")
    faulty.write_bytes("other", b"fine")
    with pytest.raises(StorageError, match="no space"):
        faulty.write_bytes("full", b"x")
    assert [info.key for info in faulty.list()] == ["other"]
    faulty.assert_all_fired()


def test_commit_fault_leaves_nothing(faulty: FaultyStorage) -> None:
    faulty.add_fault("commit", StorageError("connection reset"))
    with pytest.raises(StorageError, match="connection reset"):
        faulty.write_bytes("k", b"data")
    assert faulty.list() == []
    faulty.write_bytes("k", b"data")  # the retry succeeds
    assert faulty.read_bytes("k") == b"data"
    faulty.assert_all_fired()


def test_commit_with_lost_reply(faulty: FaultyStorage) -> None:
    faulty.add_fault("commit", StorageError("timeout"), after_call=True)
    with pytest.raises(StorageError, match="timeout"):
        faulty.write_bytes("k", b"data")
    assert faulty.read_bytes("k") == b"data"  # it was committed after all
    with pytest.raises(ObjectExists):
        faulty.write_bytes("k", b"data")
    faulty.assert_all_fired()


def test_delete_with_lost_reply(faulty: FaultyStorage) -> None:
    faulty.write_bytes("k", b"data")
    faulty.add_fault("delete", StorageError("timeout"), after_call=True)
    with pytest.raises(StorageError, match="timeout"):
        faulty.delete("k")
    assert not faulty.exists("k")
    faulty.delete("k")
    faulty.assert_all_fired()


def test_open_read_and_read_faults(faulty: FaultyStorage) -> None:
    data = payload(1000)
    faulty.write_bytes("k", data)
    faulty.add_fault("open_read", ObjectNotFound("gone for a moment"))
    faulty.add_fault("open_read.read", StorageError("connection dropped"), after_bytes=250)
    with pytest.raises(ObjectNotFound, match="gone for a moment"):
        faulty.open_read("k")
    with faulty.open_read("k") as stream:
        assert stream.read(100) == data[:100]
        assert stream.read(150) == data[100:250]
        with pytest.raises(StorageError, match="connection dropped"):
            stream.read(1)
    assert faulty.read_bytes("k") == data  # the fault fired once
    faulty.assert_all_fired()


def test_stat_list_and_delete_faults(faulty: FaultyStorage) -> None:
    faulty.write_bytes("a/k", b"x")
    faulty.add_fault("stat", StorageError("stat failed"))
    faulty.add_fault("list", StorageError("list failed"), key="a/")
    faulty.add_fault("delete", StorageError("delete failed"))
    with pytest.raises(StorageError, match="stat failed"):
        faulty.exists("a/k")
    assert faulty.list("b/") == []  # another prefix
    with pytest.raises(StorageError, match="list failed"):
        faulty.list("a/")
    with pytest.raises(StorageError, match="delete failed"):
        faulty.delete("a/k")
    assert faulty.exists("a/k")
    faulty.assert_all_fired()


def test_abort_fault_does_not_hide_the_original_error(faulty: FaultyStorage) -> None:
    faulty.add_fault("abort", StorageError("cleanup failed"))
    with pytest.raises(RuntimeError, match="producer"), faulty.open_write("k") as writer:
        writer.write(b"x")
        raise RuntimeError("producer failed")
    assert faulty.list() == []
    faulty.assert_all_fired()


def test_times_and_order(faulty: FaultyStorage) -> None:
    faulty.add_fault("stat", StorageError("first"), times=2)
    faulty.add_fault("stat", StorageError("second"))
    messages = []
    for _ in range(4):
        try:
            faulty.stat("k")
        except ObjectNotFound:
            messages.append("not found")
        except StorageError as err:
            messages.append(str(err))
    assert messages == ["first", "first", "second", "not found"]
    assert faulty.calls["stat"] == 4
    faulty.assert_all_fired()


def test_unlimited_fault(faulty: FaultyStorage) -> None:
    faulty.add_fault("list", StorageError("down"), times=None)
    for _ in range(5):
        with pytest.raises(StorageError):
            faulty.list()
    faulty.assert_all_fired()


def test_assert_all_fired_names_what_did_not(faulty: FaultyStorage) -> None:
    faulty.add_fault("stat", StorageError("never hit"))
    faulty.add_fault("commit", StorageError("hit once of two"), times=2)
    with pytest.raises(StorageError):
        faulty.write_bytes("k", b"x")
    with pytest.raises(AssertionError) as info:
        faulty.assert_all_fired()
    assert "stat" in str(info.value)
    assert "fired 1 of 2" in str(info.value)


def test_hook_lines_up_a_race(faulty: FaultyStorage) -> None:
    # Hold one writer inside commit while another writer of the same key commits first.
    inside_commit = threading.Event()
    release = threading.Event()

    def hold() -> None:
        inside_commit.set()
        release.wait(10)

    faulty.add_fault("commit", hook=hold, key="race")
    errors: list[BaseException] = []

    def slow_writer() -> None:
        try:
            faulty.write_bytes("race", b"slow")
        except ObjectExists as err:
            errors.append(err)

    thread = threading.Thread(target=slow_writer)
    thread.start()
    assert inside_commit.wait(10)
    faulty.inner.write_bytes("race", b"fast")
    release.set()
    thread.join()
    assert len(errors) == 1
    assert faulty.read_bytes("race") == b"fast"
    faulty.assert_all_fired()


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("nope", {"error": StorageError("x")}),
        ("stat", {"error": StorageError("x"), "after_bytes": 10}),
        ("stat", {"error": StorageError("x"), "after_call": True}),
        ("stat", {}),
        ("stat", {"error": StorageError("x"), "times": 0}),
    ],
)
def test_invalid_fault_declarations(
    faulty: FaultyStorage, method: str, kwargs: dict[str, object]
) -> None:
    with pytest.raises(ValueError):
        faulty.add_fault(method, **kwargs)  # type: ignore[arg-type]
