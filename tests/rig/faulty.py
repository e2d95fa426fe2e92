"""A storage wrapper that injects faults, for tests (kopia's blobtesting/faulty.go in Python).

Wrap a real storage, declare faults per method, run the code under test, then check that every
declared fault fired::

    faulty = FaultyStorage(PosixStorage(tmp_path))
    faulty.add_fault("open_write.write", StorageError("boom"), after_bytes=1 << 20)
    faulty.add_no_space(key="backup/x/data", after_bytes=4096)
    ... run the code under test against `faulty` ...
    faulty.assert_all_fired()

Methods that take faults (`FAULT_POINTS`): `open_write`, `commit`, `abort`, `open_read`, `stat`,
`list`, `delete`, and the streams: `open_write.write` (a writer's write) and `open_read.read` (a
reader's read). `write_bytes`, `read_bytes` and `exists` are built on those, so faults reach them.
"""

from __future__ import annotations

import io
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import BinaryIO, TypeVar, cast

from drkit.storage.base import (
    BaseStorage,
    BaseWriter,
    Capabilities,
    ObjectInfo,
    ObjectWriter,
    Storage,
    no_space_error,
)

FAULT_POINTS = frozenset(
    {
        "open_write",
        "open_write.write",
        "commit",
        "abort",
        "open_read",
        "open_read.read",
        "stat",
        "list",
        "delete",
    }
)
STREAM_POINTS = frozenset({"open_write.write", "open_read.read"})
# Methods with side effects, where "it worked but the reply was lost" is a real failure.
AFTER_CALL_POINTS = frozenset({"commit", "delete"})

T = TypeVar("T")
ErrorSpec = BaseException | Callable[[str], BaseException]


@dataclass
class Fault:
    """One declared fault; `fired` counts how often it was hit."""

    method: str
    error: ErrorSpec | None
    key: str | None
    after_bytes: int
    times: int | None
    after_call: bool
    hook: Callable[[], None] | None
    fired: int = 0

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.fired >= self.times

    def trigger(self, key: str) -> None:
        """Run the hook, then raise the error (if any)."""
        if self.hook is not None:
            self.hook()
        if self.error is None:
            return
        raise self.error if isinstance(self.error, BaseException) else self.error(key)


class FaultyStorage(BaseStorage):
    """Passes every call to `inner`, except where a declared fault fires.

    `calls` counts every call per fault point, fault or not (e.g. to see how often a retry
    wrapper above tried). Thread-safe: concurrent writers may hit the same faults.
    """

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.name = inner.name
        self.capabilities: Capabilities = inner.capabilities
        self.calls: Counter[str] = Counter()
        self._faults: list[Fault] = []
        self._lock = threading.Lock()

    @property
    def location(self) -> str:
        return self.inner.location

    def add_fault(
        self,
        method: str,
        error: ErrorSpec | None = None,
        *,
        key: str | None = None,
        after_bytes: int = 0,
        times: int | None = 1,
        after_call: bool = False,
        hook: Callable[[], None] | None = None,
    ) -> Fault:
        """Declare a fault; faults of one method fire in the order they were added.

        error: the exception to raise, or a function of the key (the prefix for `list`) that
            makes one; None to only run `hook` and carry on.
        key: fire only for this key (for `list`: this prefix); None for any.
        after_bytes: streams only. For `open_write.write` the write that would pass this many
            bytes writes the bytes up to it to the inner writer, then fails (a disk filling up
            mid-object). For `open_read.read` the read that would pass it fails, so the reader
            got only what earlier reads returned (a connection dropped mid-object).
        times: how many calls fire (None: every call from now on).
        after_call: `commit` and `delete` only: the inner call succeeds, then the error is
            raised anyway (the reply was lost).
        hook: called when the fault fires, before the error (e.g. wait on a threading.Event to
            line up a race).
        """
        if method not in FAULT_POINTS:
            raise ValueError(
                f"unknown fault point {method!r}; expected one of {sorted(FAULT_POINTS)}"
            )
        if after_bytes and method not in STREAM_POINTS:
            raise ValueError(f"after_bytes applies to {sorted(STREAM_POINTS)} only, not {method!r}")
        if after_call and method not in AFTER_CALL_POINTS:
            raise ValueError(f"after_call applies to {sorted(AFTER_CALL_POINTS)} only")
        if error is None and hook is None:
            raise ValueError("a fault needs an error, a hook or both")
        if after_bytes < 0 or (times is not None and times < 1):
            raise ValueError("after_bytes must be >= 0 and times >= 1 or None")
        fault = Fault(method, error, key, after_bytes, times, after_call, hook)
        with self._lock:
            self._faults.append(fault)
        return fault

    def add_no_space(
        self, *, key: str | None = None, after_bytes: int = 0, times: int | None = 1
    ) -> Fault:
        """A disk that fills up after `after_bytes` bytes of a write, failing as a driver does."""
        return self.add_fault(
            "open_write.write",
            lambda failed_key: no_space_error(failed_key, self.name),
            key=key,
            after_bytes=after_bytes,
            times=times,
        )

    def assert_all_fired(self) -> None:
        """Raise AssertionError naming every fault that fired fewer times than declared."""
        with self._lock:
            pending = [f for f in self._faults if f.fired == 0 or (f.times and f.fired < f.times)]
        if pending:
            lines = "\n".join(
                f"  {f.method} key={f.key!r} error={f.error!r}: fired {f.fired} of "
                f"{'unlimited' if f.times is None else f.times}"
                for f in pending
            )
            raise AssertionError(f"not all storage faults fired:\n{lines}")

    def open_write(self, key: str) -> ObjectWriter:
        return _FaultyWriter(self, key, self._call("open_write", key, self.inner.open_write, key))

    def open_read(
        self, key: str, offset: int = 0, length: int | None = None, *, sequential: bool = False
    ) -> BinaryIO:
        read = partial(self.inner.open_read, sequential=sequential)
        stream = self._call("open_read", key, read, key, offset, length)
        return cast(BinaryIO, _FaultyReader(self, key, stream))

    def stat(self, key: str) -> ObjectInfo:
        return self._call("stat", key, self.inner.stat, key)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        return self._call("list", prefix, self.inner.list, prefix)

    def delete(self, key: str) -> None:
        self._call("delete", key, self.inner.delete, key)

    def _take(self, method: str, key: str, stream_end: int | None = None) -> Fault | None:
        """Count the call and return the first live fault it hits, marking it fired."""
        with self._lock:
            self.calls[method] += 1
            for fault in self._faults:
                if fault.method != method or fault.exhausted:
                    continue
                if fault.key is not None and fault.key != key:
                    continue
                if stream_end is not None and stream_end <= fault.after_bytes:
                    continue
                fault.fired += 1
                return fault
        return None

    def _call(self, method: str, key: str, fn: Callable[..., T], *args: object) -> T:
        fault = self._take(method, key)
        if fault is None:
            return fn(*args)
        if fault.after_call:
            result = fn(*args)
            fault.trigger(key)
            return result
        fault.trigger(key)
        return fn(*args)


class _FaultyWriter(BaseWriter):
    def __init__(self, storage: FaultyStorage, key: str, inner: ObjectWriter) -> None:
        super().__init__(key)
        self._storage = storage
        self._inner = inner
        self._written = 0

    def _write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        end = self._written + len(view)
        fault = self._storage._take("open_write.write", self.key, stream_end=end)
        if fault is not None and fault.error is not None:
            allowed = max(0, fault.after_bytes - self._written)
            if allowed:
                self._inner.write(view[:allowed])
                self._written += allowed
        if fault is not None:
            fault.trigger(self.key)
        self._inner.write(view)
        self._written = end

    def _commit(self) -> None:
        self._storage._call("commit", self.key, self._inner.commit)

    def _abort(self) -> None:
        self._storage._call("abort", self.key, self._inner.abort)


class _FaultyReader(io.BufferedIOBase):
    def __init__(self, storage: FaultyStorage, key: str, inner: BinaryIO) -> None:
        super().__init__()
        self._storage = storage
        self._key = key
        self._inner = inner
        self._position = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        data = self._inner.read(-1 if size is None else size)
        if data:
            end = self._position + len(data)
            fault = self._storage._take("open_read.read", self._key, stream_end=end)
            if fault is not None:
                fault.trigger(self._key)
            self._position = end
        return data

    def read1(self, size: int = -1) -> bytes:
        return self.read(size)

    def close(self) -> None:
        self._inner.close()
        super().close()
