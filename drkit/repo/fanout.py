"""Fan-out: write a backup's data objects to the other repositories while the backup writes them.

Without it a backup is written whole to the primary repository and only then copied to the
others, so each copy adds its whole duration to the backup's. The fan-out overlaps the two: while
the backup pipeline writes a data object to the primary, the same encrypted bytes are queued for
each other repository, where a small pool of threads writes them as they come; once the primary
has committed the object, the copy is committed too if its SHA-256 is the one the primary
recorded (and the target's written SHA-256 as well).

What stays as it was:

- **Nothing partial is listed.** Only data objects land early. Key records and the manifest are
  written to a target by the final copy (`Replicator.copy_backup`), after the backup is complete,
  manifest last; it skips the data objects the target already has.
- **A target never fails the backup.** A target that is down or fails stops receiving objects
  (the error is recorded); the final copy tries once more and reports, and `drkit replicate`
  catches up later.
- **Streaming is an optimisation, and a slow target cannot hold the backup up.** Each copy
  queues at most ``OBJECT_BUDGET`` bytes; when its queue is full the backup waits for the target,
  but ``STALL_LIMIT`` seconds at most: then the copy is dropped, the target gets nothing more
  streamed, and the final copy does the rest. An object that finds no free copy thread is left
  to the final copy too. Memory per target: its ``workers`` copies' queues, plus each target
  writer's buffers (S3: its parts in flight).
- **Locks.** Each target's backup lock and lease (drkit/repo/lease.py) are held from the start
  of the backup to the end of its final copy, so a prune there, on this host or another, never
  sees a half-copied backup. A target whose lock is busy is not streamed to; the final copy
  takes its lock as `drkit replicate` does. A target whose lease is busy gets nothing now.
- **Cleanup.** A backup that fails deletes what it streamed (best effort). A backup killed
  outright leaves unlisted data objects in the targets as in the primary; the next backup removes
  them from each target when it starts streaming there, as it does in the primary (a target's
  `prune` removes them too). When the target's retention would prune the new backup at once, the
  final copy skips it and what was streamed is deleted again.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, suppress
from types import TracebackType
from typing import Self

from drkit.config.settings import RepoSettings, Settings
from drkit.errors import DrkitError, IntegrityError, LockError, ObjectLocked
from drkit.repo.copies import CopyService, ReplicationReport, Replicator
from drkit.repo.label import BackupLabel
from drkit.repo.lease import RepositoryLease
from drkit.repo.lock import operation_lock
from drkit.repo.manifest import ObjectEntry
from drkit.repo.open import open_storage, repo_location
from drkit.repo.repository import Repository

OBJECT_BUDGET = 16 * 1024 * 1024  # bytes a copy may fall behind the backup
STALL_LIMIT = 2.0  # seconds, in all, a target that falls further behind may hold the backup up


class FanOut:
    """Streams one backup's data objects from the primary to every other repository.

    Use as a context manager around the backup: ``start`` once the backup is about to write,
    ``begin`` for every data object, ``finish`` once its manifest is written. Leaving the
    block with an exception before ``finish`` takes back what was streamed; leaving it in any way
    releases the targets' locks.
    """

    def __init__(self, settings: Settings, primary: Repository) -> None:
        self.settings = settings
        self.primary = primary
        self._streams: list[_Stream] = []
        self._locks = ExitStack()
        self._finished = False

    def start(self, system_identifier: int) -> None:
        """Take each other repository's backup lock and start streaming to it."""
        workers = self.settings.backup.process_max
        for target in self.settings.repo[1:]:
            try:
                self._locks.enter_context(
                    operation_lock(self.settings.lock_path, repo_location(target), "backup")
                )
            except LockError:
                continue  # a replicate or prune runs there: left to the final copy
            self._streams.append(
                _Stream(target, self.primary, system_identifier, workers, self.settings)
            )

    @property
    def streaming(self) -> bool:
        return bool(self._streams)

    def begin(self, key: str) -> ObjectCopies | None:
        """The backup starts writing the data object ``key`` in the primary: start its copies
        (None: no target takes it now, the final copy will). Called from the backup's workers;
        never blocks."""
        uploads = [u for s in self._streams if (u := s.begin(key)) is not None]
        return ObjectCopies(uploads) if uploads else None

    def finish(self, label: BackupLabel) -> ReplicationReport:
        """The backup is complete in the primary: wait for the copies in flight, then copy
        the rest (data objects not streamed, key records, the manifest last) under the locks
        held since ``start``."""
        for stream in self._streams:
            stream.drain()
        self._finished = True  # from here a target may list the backup: never take it back
        streams = {stream.name: stream for stream in self._streams}
        held = {stream.name: stream.final_lease() for stream in self._streams}
        report = CopyService(self.settings, [label], held_locks=held).catch_up()
        for result in report.repos:
            if (streamed := streams.get(result.repo)) is None:
                continue  # its lock was busy: not streamed to
            result.streamed = len(streamed.copied)
            result.stream_error = streamed.error
            result.removed_leftovers = streamed.removed_leftovers
            if result.error is None and str(label) not in result.copied_backups:
                streamed.take_back()  # the target's retention would prune it at once
        return report

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            for stream in self._streams:
                if exc_type is not None and not self._finished:
                    stream.abandon()  # the backup failed: it is never listed, nor are its copies
                else:
                    stream.drain()
        finally:
            for stream in self._streams:
                stream.release()
            self._locks.close()


class _Stream:
    """Copies to one target repository: ``workers`` threads and a bounded queue."""

    def __init__(
        self,
        target: RepoSettings,
        primary: Repository,
        system_identifier: int,
        workers: int,
        settings: Settings,
    ) -> None:
        self.name = target.name
        self.lease: RepositoryLease | None = None  # the target's, from _prepare to release
        self._target = target
        self._keys = primary.keys
        self._settings = settings
        self.copied: list[str] = []  # keys committed in the target
        self.removed_leftovers: list[str] = []
        self.error: str | None = None  # set once; no object is copied after it
        self._limit = workers
        self._pending = 0
        self._closed = False
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"fanout-{target.name}")
        # Opened and checked on the pool, so a target that is slow to answer never delays the
        # backup; the copies queued meanwhile wait for it.
        self._replicator: Future[Replicator | None] = self._pool.submit(
            self._prepare, target, primary, system_identifier, workers
        )

    def begin(self, key: str) -> _Upload | None:
        """A copy of ``key`` fed as the backup writes it; None when every copy thread is busy
        (the object is left to the final copy)."""
        with self._lock:
            if self._closed or self.error is not None or self._pending >= self._limit:
                return None
            self._pending += 1
        upload = _Upload(key)
        self._pool.submit(self._upload, upload)
        return upload

    def drain(self) -> None:
        """Wait for every queued and running copy: afterwards nothing is written to the target."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True)

    def abandon(self) -> None:
        """Drop the queue, wait for the copies running, delete everything streamed."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.take_back()

    def take_back(self) -> None:
        """Delete the streamed objects from the target, best effort: what a target that is down
        (or under Object Lock) keeps is an unlisted leftover, removed by the next backup."""
        if not self.copied:
            return
        replicator = self._replicator.result()
        assert replicator is not None  # something was copied
        with suppress(DrkitError):
            for key in self.copied:
                replicator.target.storage.delete(key)

    def _prepare(
        self, target: RepoSettings, primary: Repository, system_identifier: int, workers: int
    ) -> Replicator | None:
        """Check the target (never created here: 'drkit init' does) and remove the leftovers
        of backups that never completed, as a backup does in the primary. A partial copy of a
        backup the primary lists stays: the next copy of it resumes from it."""
        try:
            repo = Repository(open_storage(target), primary.keys)
            repo.check(system_identifier)
            lease = self._take_lease(repo)
            leftovers = [label for label in repo.incomplete() if lease.may_remove(label)]
            complete = set(primary.backups()) if leftovers else set()
            for label in leftovers:
                if label not in complete:
                    with suppress(ObjectLocked):  # removed once its retention has passed
                        repo.delete_objects(label)
                        self.removed_leftovers.append(str(label))
            return Replicator(primary, repo, workers)
        except Exception as exc:  # streaming is an optimisation: the final copy reports
            self._fail(exc)
            return None

    def _take_lease(self, repo: Repository) -> RepositoryLease:
        lease = RepositoryLease(repo.storage, "backup", "backup", self._settings.lease)
        lease.acquire()
        self.lease = lease
        return lease

    def final_lease(self) -> RepositoryLease | DrkitError:
        """The target's lease for the final copy: the one streaming took, else one taken now
        (after `drain`), else why there is none."""
        if self.lease is not None:
            return self.lease
        try:
            repo = Repository(open_storage(self._target), self._keys)
            repo.check()  # never the first object written to a place
            return self._take_lease(repo)
        except DrkitError as exc:
            return exc

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def _upload(self, upload: _Upload) -> None:
        try:
            replicator = self._replicator.result()
            if replicator is None or self.error is not None:
                upload.drop()
            elif upload.write_to(replicator.target):
                with self._lock:
                    self.copied.append(upload.key)
            elif upload.stalled:
                with self._lock:
                    self._closed = True  # too slow for the backup: the final copy does the rest
        except Exception as exc:  # streaming is an optimisation: the final copy reports
            upload.drop()
            self._fail(exc)
        finally:
            with self._lock:
                self._pending -= 1

    def _fail(self, exc: Exception) -> None:
        with self._lock:
            if self.error is None:
                self.error = str(exc) if isinstance(exc, DrkitError) else f"unexpected: {exc!r}"


class ObjectCopies:
    """The copies of one data object the backup is writing, one per target being streamed to."""

    def __init__(self, uploads: list[_Upload]) -> None:
        self._uploads = uploads

    def write(self, data: bytes | memoryview) -> None:
        chunk = bytes(data)  # the caller may reuse its buffer
        for upload in self._uploads:
            upload.put(chunk)

    def committed(self, obj: ObjectEntry) -> None:
        """The primary committed the object: each copy commits once its SHA-256 agrees."""
        for upload in self._uploads:
            upload.finish(obj)

    def abandon(self) -> None:
        for upload in self._uploads:
            upload.drop()


class _Upload:
    """One object on its way to one target: the backup ``put``s its bytes (never blocking),
    a copy thread writes them to the target (``write_to``) and commits once the primary has."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._chunks: deque[bytes] = deque()
        self._queued = 0
        self._expected: ObjectEntry | None = None  # set when the primary committed
        self._dropped = False
        self._ready = threading.Condition()
        self._patience = STALL_LIMIT  # seconds the backup may wait for this copy, in all
        self.stalled = False  # dropped because the target could not keep up

    def put(self, chunk: bytes) -> None:
        """Queue ``chunk``; while the queue is full, wait for the target up to STALL_LIMIT
        seconds in all, then drop the copy (the final copy does it)."""
        with self._ready:
            while not self._dropped and self._queued + len(chunk) > OBJECT_BUDGET:
                waited = time.monotonic()
                self._ready.wait(self._patience)
                self._patience -= time.monotonic() - waited
                if self._patience <= 0:
                    self.stalled = True
                    self._drop()
            if self._dropped:
                return
            self._chunks.append(chunk)
            self._queued += len(chunk)
            self._ready.notify_all()

    def finish(self, obj: ObjectEntry) -> None:
        with self._ready:
            self._expected = obj
            self._ready.notify_all()

    def drop(self) -> None:
        with self._ready:
            self._drop()

    def _drop(self) -> None:
        self._dropped = True
        self._chunks.clear()
        self._queued = 0
        self._ready.notify_all()

    def _next(self) -> bytes | None:
        """The next chunk to write; None once the primary committed and all is written."""
        with self._ready:
            while not self._chunks and self._expected is None and not self._dropped:
                self._ready.wait()
            if self._dropped:
                raise _Dropped
            if not self._chunks:
                return None
            chunk = self._chunks.popleft()
            self._queued -= len(chunk)
            self._ready.notify_all()  # room for the backup's next chunk
            return chunk

    def write_to(self, target: Repository) -> bool:
        """Write the object to ``target`` as it comes; True once committed there and checked
        (the writer hashes what it sends: it must be the primary's SHA-256), False when dropped
        (nothing is left in the target)."""
        size = 0
        with target.storage.open_write(self.key) as writer:
            try:
                while (chunk := self._next()) is not None:
                    size += len(chunk)
                    writer.write(chunk)
            except _Dropped:
                writer.abort()
                return False
            expected = self._expected
            assert expected is not None
            if size != expected.size:
                writer.abort()
                raise IntegrityError(f"bytes streamed for '{self.key}' differ from the primary's")
            written = writer.commit()
        if written.sha256 != expected.sha256:
            with suppress(DrkitError):  # never leave a bad copy the final copy would skip
                target.storage.delete(self.key)
            raise IntegrityError(f"copy of '{self.key}' to '{target.name}' differs from the source")
        return True


class _Dropped(Exception):
    """The copy was dropped (too far behind, or the backup failed)."""
