"""The conformance suite every storage driver passes (restic's internal/backend/test/suite.go).

A driver's test module subclasses `StorageConformance` and provides a function-scoped `storage`
fixture yielding an empty store. The suite uses the `Storage` protocol only, never a driver's
internals, so the same tests hold the posix and the S3 drivers (and wrappers) to one contract.
"""

from __future__ import annotations

import hashlib
import random
import threading

import pytest

from drkit.errors import ObjectExists, ObjectNotFound
from drkit.storage.base import Capabilities, ObjectInfo, Storage, WrittenObject

MiB = 1024 * 1024
# Odd sizes so that no chunk lines up with a buffer, a page or a multipart part.
ODD_CHUNKS = (1, 7, 4093, 65537, 1000003, 3, 262147)

INVALID_KEYS = [
    "",
    "/abs",
    "trailing/",
    "a//b",
    ".",
    "..",
    "./a",
    "a/.",
    "a/./b",
    "../a",
    "a/../b",
    "a/..",
    "back\\slash",
    "nul\0byte",
    "x" * 256,
    "/".join(["y" * 200] * 6),
]
INVALID_PREFIXES = ["/", "/abs", "a//", "../", "a/../", "./", "back\\slash", "nul\0"]
ODD_VALID_KEYS = ["a", "with space/x", "ünïcødé/€", "dots/a.b/..c/...", "x/.hidden", "a-b_c=d+e"]


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def keys(storage: Storage, prefix: str = "") -> list[str]:
    return [info.key for info in storage.list(prefix)]


class StorageConformance:
    """Tests against the `Storage` protocol; subclasses provide the `storage` fixture."""

    # -- writing and reading whole objects ----------------------------------------------------

    def test_implements_the_protocol(self, storage: Storage) -> None:
        assert isinstance(storage, Storage)
        assert isinstance(storage.name, str)
        assert storage.name
        assert isinstance(storage.capabilities, Capabilities)

    @pytest.mark.parametrize("size", [0, 1, 2, 4096, 65537])
    def test_write_bytes_round_trip(self, storage: Storage, size: int) -> None:
        data = payload(size, seed=size)
        written = storage.write_bytes("obj", data)
        assert written == WrittenObject("obj", size, sha256(data))
        assert storage.read_bytes("obj") == data
        assert storage.stat("obj") == ObjectInfo("obj", size)
        assert storage.exists("obj")

    def test_streamed_10mib_in_odd_chunks(self, storage: Storage) -> None:
        data = payload(10 * MiB, seed=10)
        with storage.open_write("big/object") as writer:
            position = 0
            chunks = iter(ODD_CHUNKS * 100)
            while position < len(data):
                size = next(chunks)
                writer.write(data[position : position + size])
                position += size
        written = writer.commit()
        assert written == WrittenObject("big/object", len(data), sha256(data))
        assert storage.stat("big/object").size == len(data)

        digest = hashlib.sha256()
        total = 0
        with storage.open_read("big/object") as stream:
            for size in ODD_CHUNKS * 100:
                chunk = stream.read(size)
                digest.update(chunk)
                total += len(chunk)
                if len(chunk) < size:
                    break
            assert stream.read(1) == b""
        assert total == len(data)
        assert digest.hexdigest() == sha256(data)

    def test_write_accepts_memoryview(self, storage: Storage) -> None:
        data = payload(10000, seed=1)
        with storage.open_write("mv") as writer:
            writer.write(memoryview(data)[:3000])
            writer.write(memoryview(bytearray(data[3000:])))
        assert writer.commit() == WrittenObject("mv", len(data), sha256(data))
        assert storage.read_bytes("mv") == data

    @pytest.mark.parametrize("key", ODD_VALID_KEYS)
    def test_unusual_valid_keys(self, storage: Storage, key: str) -> None:
        storage.write_bytes(key, key.encode())
        assert storage.read_bytes(key) == key.encode()
        assert keys(storage) == [key]
        storage.delete(key)
        assert keys(storage) == []

    # -- ranged and streaming reads -----------------------------------------------------------

    @pytest.mark.parametrize(
        ("offset", "length", "expected"),
        [
            (0, None, slice(0, 1000)),
            (0, 0, slice(0, 0)),
            (0, 1, slice(0, 1)),
            (10, None, slice(10, 1000)),
            (10, 90, slice(10, 100)),
            (999, None, slice(999, 1000)),
            (999, 1, slice(999, 1000)),
            (990, 100, slice(990, 1000)),  # length beyond the end: what exists
            (1000, None, slice(0, 0)),  # offset == size
            (1000, 10, slice(0, 0)),
            (5000, 10, slice(0, 0)),  # offset beyond the end
        ],
    )
    def test_ranged_read(
        self, storage: Storage, offset: int, length: int | None, expected: slice
    ) -> None:
        data = payload(1000, seed=2)
        storage.write_bytes("ranged", data)
        assert storage.read_bytes("ranged", offset, length) == data[expected]
        with storage.open_read("ranged", offset=offset, length=length) as stream:
            assert stream.read() == data[expected]
        with storage.open_read("ranged", offset, length, sequential=True) as stream:
            assert stream.read() == data[expected]

    def test_random_ranges(self, storage: Storage) -> None:
        data = payload(100_000, seed=3)
        storage.write_bytes("random", data)
        rng = random.Random(4)
        for _ in range(100):
            offset = rng.randrange(len(data) + 10)
            length = rng.choice([None, 0, 1, rng.randrange(len(data) + 10)])
            end = len(data) if length is None else offset + length
            assert storage.read_bytes("random", offset, length) == data[offset:end]

    def test_open_read_streams_in_chunks(self, storage: Storage) -> None:
        data = payload(300_000, seed=5)
        storage.write_bytes("stream", data)
        with storage.open_read("stream", offset=12345, length=200_001) as stream:
            parts: list[bytes] = []
            while chunk := stream.read(65_537):
                assert len(chunk) == 65_537 or sum(map(len, parts)) + len(chunk) == 200_001
                parts.append(chunk)
            assert stream.read(10) == b""
        assert b"".join(parts) == data[12345 : 12345 + 200_001]

    def test_negative_range_is_invalid(self, storage: Storage) -> None:
        storage.write_bytes("neg", b"abc")
        with pytest.raises(ValueError):
            storage.read_bytes("neg", offset=-1)
        with pytest.raises(ValueError):
            storage.open_read("neg", offset=0, length=-1)

    # -- missing objects ----------------------------------------------------------------------

    def test_missing_object(self, storage: Storage) -> None:
        with pytest.raises(ObjectNotFound):
            storage.stat("missing")
        with pytest.raises(ObjectNotFound):
            storage.open_read("missing")
        with pytest.raises(ObjectNotFound):
            storage.read_bytes("missing")
        with pytest.raises(ObjectNotFound):
            storage.read_bytes("missing", 0, 0)
        with pytest.raises(ObjectNotFound):
            storage.read_bytes("nested/missing", 10, 10)
        assert not storage.exists("missing")

    def test_prefix_of_an_object_is_not_an_object(self, storage: Storage) -> None:
        storage.write_bytes("dir/object", b"x")
        with pytest.raises(ObjectNotFound):
            storage.stat("dir")
        with pytest.raises(ObjectNotFound):
            storage.read_bytes("dir")
        assert not storage.exists("dir")
        storage.delete("dir")
        assert keys(storage) == ["dir/object"]

    # -- listing ------------------------------------------------------------------------------

    def test_list_empty(self, storage: Storage) -> None:
        assert storage.list() == []
        assert storage.list("anything/") == []

    def test_list_prefix_semantics(self, storage: Storage) -> None:
        for key in ["b/x", "ab", "a/x", "abc/d", "a/b/c", "a1"]:
            storage.write_bytes(key, key.encode() * 3)
        assert keys(storage) == ["a/b/c", "a/x", "a1", "ab", "abc/d", "b/x"]
        assert keys(storage, "a") == ["a/b/c", "a/x", "a1", "ab", "abc/d"]
        assert keys(storage, "a/") == ["a/b/c", "a/x"]
        assert keys(storage, "a/b") == ["a/b/c"]
        assert keys(storage, "a/b/c") == ["a/b/c"]
        assert keys(storage, "a/b/c/") == []
        assert keys(storage, "ab") == ["ab", "abc/d"]
        assert keys(storage, "abc/") == ["abc/d"]
        assert keys(storage, "zzz") == []
        assert keys(storage, "zzz/") == []
        assert storage.list("a/") == [ObjectInfo("a/b/c", 15), ObjectInfo("a/x", 9)]

    def test_list_nested_and_sorted(self, storage: Storage) -> None:
        written = ["z", "m/n/o/p", "m/a", "m/n/b", "0", "m/n/o/a"]
        for index, key in enumerate(written):
            storage.write_bytes(key, b"x" * index)
        listed = storage.list()
        assert [info.key for info in listed] == sorted(written)
        assert {info.key: info.size for info in listed} == {k: i for i, k in enumerate(written)}

    def test_list_many_keys(self, storage: Storage) -> None:
        expected = {}
        for i in range(500):
            key = f"many/{i % 7}/{i:04d}"
            data = payload(i % 13, seed=i)
            storage.write_bytes(key, data)
            expected[key] = len(data)
        listed = storage.list("many/")
        assert [info.key for info in listed] == sorted(expected)
        assert {info.key: info.size for info in listed} == expected
        assert keys(storage, "many/3/") == sorted(k for k in expected if k.startswith("many/3/"))
        assert keys(storage, "many/3/00") == [f"many/3/00{n:02d}" for n in range(3, 100, 7)]

    def test_list_excludes_writes_in_progress(self, storage: Storage) -> None:
        storage.write_bytes("done", b"1")
        writer = storage.open_write("pending/object")
        writer.write(payload(100_000))
        assert keys(storage) == ["done"]
        assert not storage.exists("pending/object")
        with pytest.raises(ObjectNotFound):
            storage.stat("pending/object")
        with pytest.raises(ObjectNotFound):
            storage.open_read("pending/object")
        writer.commit()
        assert keys(storage) == ["done", "pending/object"]

    def test_list_excludes_aborted_writes(self, storage: Storage) -> None:
        writer = storage.open_write("aborted")
        writer.write(b"data")
        writer.abort()
        assert storage.list() == []
        assert not storage.exists("aborted")

    # -- write-once ---------------------------------------------------------------------------

    def test_open_write_on_existing_key_raises(self, storage: Storage) -> None:
        storage.write_bytes("once", b"first")
        with pytest.raises(ObjectExists):
            storage.open_write("once")
        with pytest.raises(ObjectExists):
            storage.write_bytes("once", b"second")
        assert storage.read_bytes("once") == b"first"
        assert keys(storage) == ["once"]

    def test_interleaved_writers_first_commit_wins(self, storage: Storage) -> None:
        first = storage.open_write("race")
        second = storage.open_write("race")
        first.write(b"first writer")
        second.write(b"second writer, longer")
        second.commit()
        with pytest.raises(ObjectExists):
            first.commit()
        assert storage.read_bytes("race") == b"second writer, longer"
        assert keys(storage) == ["race"]
        first.abort()  # idempotent after the failed commit

    def test_concurrent_writers_exactly_one_wins(self, storage: Storage) -> None:
        assert storage.capabilities.conditional_create  # every driver has it: this proves it
        writers = 8
        barrier = threading.Barrier(writers)
        results: dict[int, WrittenObject | BaseException] = {}

        def write(index: int) -> None:
            passed_barrier = False
            try:
                writer = storage.open_write("contended")
                writer.write(f"writer {index} ".encode() * 1000)
                barrier.wait()
                passed_barrier = True
                results[index] = writer.commit()
            except Exception as err:  # collected and asserted on below
                results[index] = err
                if not passed_barrier:  # release the others only if they still wait on us
                    barrier.abort()

        threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        winners = [i for i, r in results.items() if isinstance(r, WrittenObject)]
        losers = [r for r in results.values() if not isinstance(r, WrittenObject)]
        assert len(winners) == 1, results
        assert all(isinstance(r, ObjectExists) for r in losers), losers
        assert storage.read_bytes("contended") == f"writer {winners[0]} ".encode() * 1000
        assert keys(storage) == ["contended"]

    # -- the writer's life cycle --------------------------------------------------------------

    def test_exception_inside_with_leaves_nothing(self, storage: Storage) -> None:
        with pytest.raises(RuntimeError), storage.open_write("failed/object") as writer:
            writer.write(payload(50_000))
            raise RuntimeError("producer failed")
        assert storage.list() == []
        assert not storage.exists("failed/object")
        storage.write_bytes("failed/object", b"retry")  # the key is still free
        assert storage.read_bytes("failed/object") == b"retry"

    def test_with_block_commits(self, storage: Storage) -> None:
        with storage.open_write("ctx") as writer:
            writer.write(b"hello")
        assert storage.read_bytes("ctx") == b"hello"
        assert writer.commit() == WrittenObject("ctx", 5, sha256(b"hello"))

    def test_commit_is_idempotent_and_closes_the_writer(self, storage: Storage) -> None:
        writer = storage.open_write("done")
        writer.write(b"abc")
        result = writer.commit()
        assert writer.commit() == result
        writer.abort()  # no-op after commit
        assert storage.read_bytes("done") == b"abc"
        with pytest.raises(ValueError):
            writer.write(b"more")

    def test_abort_is_idempotent(self, storage: Storage) -> None:
        writer = storage.open_write("gone")
        writer.write(b"abc")
        writer.abort()
        writer.abort()
        with pytest.raises(ValueError):
            writer.commit()
        with pytest.raises(ValueError):
            writer.write(b"x")
        assert storage.list() == []

    def test_abort_without_writing(self, storage: Storage) -> None:
        storage.open_write("never").abort()
        assert storage.list() == []

    # -- deleting -----------------------------------------------------------------------------

    def test_delete(self, storage: Storage) -> None:
        storage.write_bytes("del/me", b"x")
        storage.write_bytes("del/keep", b"y")
        storage.delete("del/me")
        with pytest.raises(ObjectNotFound):
            storage.stat("del/me")
        with pytest.raises(ObjectNotFound):
            storage.read_bytes("del/me")
        assert not storage.exists("del/me")
        assert keys(storage) == ["del/keep"]

    def test_delete_is_idempotent(self, storage: Storage) -> None:
        storage.write_bytes("twice", b"x")
        storage.delete("twice")
        storage.delete("twice")
        storage.delete("never/written")
        assert storage.list() == []

    def test_deleted_key_can_be_written_again(self, storage: Storage) -> None:
        storage.write_bytes("d/e/f", b"old")
        storage.delete("d/e/f")
        assert storage.list() == []
        storage.write_bytes("d/e/f", b"new")
        storage.write_bytes("d/e/g", b"sibling")
        assert storage.read_bytes("d/e/f") == b"new"
        assert keys(storage, "d/") == ["d/e/f", "d/e/g"]

    # -- key validation -----------------------------------------------------------------------

    @pytest.mark.parametrize("key", INVALID_KEYS)
    def test_invalid_keys(self, storage: Storage, key: str) -> None:
        with pytest.raises(ValueError):
            storage.open_write(key)
        with pytest.raises(ValueError):
            storage.write_bytes(key, b"x")
        with pytest.raises(ValueError):
            storage.open_read(key)
        with pytest.raises(ValueError):
            storage.read_bytes(key)
        with pytest.raises(ValueError):
            storage.stat(key)
        with pytest.raises(ValueError):
            storage.exists(key)
        with pytest.raises(ValueError):
            storage.delete(key)
        assert storage.list() == []

    @pytest.mark.parametrize("prefix", INVALID_PREFIXES)
    def test_invalid_prefixes(self, storage: Storage, prefix: str) -> None:
        with pytest.raises(ValueError):
            storage.list(prefix)
