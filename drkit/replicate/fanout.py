"""Fan-out: copy a backup's data objects to the other repositories while the backup runs.

Without it a backup is written whole to the primary repository and only then copied to the
others, so each copy adds its whole duration to the backup's. The fan-out overlaps the two: the
backup pipeline reports every data object it has committed in the primary (key, size, SHA-256),
and a small pool of threads per other repository copies it at once, read back from the primary
(a file just written, still in the page cache): the same encrypted bytes, checked like every copy
(the SHA-256 read back must be the one the backup wrote, the target's written SHA-256 too).

What stays as it was:

- **Nothing partial is listed.** Only data objects land early. Key records and the manifest are
  written to a target by the final copy (`Replicator.copy_backup`), after the backup is complete,
  manifest last; it skips the data objects the target already has.
- **A target never fails the backup.** A target that is down or fails stops receiving objects
  (the error is recorded); the final copy tries once more and reports, and `drkit replicate`
  catches up later.
- **Streaming is an optimisation.** Reporting an object never blocks the backup's workers: when a
  target's queue is full, the object is left to the final copy. Memory per target: ``workers``
  copies in flight, each a 1 MiB buffer (plus the S3 writer's parts).
- **Locks.** Each target's backup lock is held from the start of the backup to the end of its
  final copy, so a prune there never sees a half-copied backup. A target whose lock is busy is
  not streamed to; the final copy takes its lock as `drkit replicate` does.
- **Cleanup.** A backup that fails deletes what it streamed (best effort). A backup killed
  outright leaves unlisted data objects in the targets as in the primary; the next backup removes
  them from each target when it starts streaming there, as it does in the primary (a target's
  `prune` removes them too). When the target's retention would prune the new backup at once, the
  final copy skips it and what was streamed is deleted again.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, suppress
from types import TracebackType
from typing import Self

from drkit.config.settings import RepoSettings, Settings
from drkit.errors import DrkitError, LockError, ObjectLocked
from drkit.replicate.operation import ReplicateOperation, ReplicationReport, Replicator
from drkit.repo.label import BackupLabel
from drkit.repo.lock import operation_lock
from drkit.repo.manifest import ObjectEntry
from drkit.repo.open import open_storage, repo_location
from drkit.repo.repository import Repository

QUEUE_PER_WORKER = 2  # objects queued or in flight per copy thread before the rest waits


class FanOut:
    """Streams one backup's data objects from the primary to every other repository.

    Use as a context manager around the backup: ``start`` once the backup is about to write,
    ``committed`` for every data object, ``finish`` once its manifest is written. Leaving the
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
            self._streams.append(_Stream(target, self.primary, system_identifier, workers))

    def committed(self, obj: ObjectEntry) -> None:
        """The backup committed the data object ``obj`` in the primary: queue its copies.
        Never blocks (called from the backup's workers)."""
        for stream in self._streams:
            stream.offer(obj)

    def finish(self, label: BackupLabel) -> ReplicationReport:
        """The backup is complete in the primary: wait for the copies in flight, then copy
        the rest (data objects not streamed, key records, the manifest last) under the locks
        held since ``start``."""
        for stream in self._streams:
            stream.drain()
        self._finished = True  # from here a target may list the backup: never take it back
        streams = {stream.name: stream for stream in self._streams}
        report = ReplicateOperation(self.settings, [label], held_locks=streams.keys()).run()
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
            self._locks.close()


class _Stream:
    """Copies to one target repository: ``workers`` threads and a bounded queue."""

    def __init__(
        self, target: RepoSettings, primary: Repository, system_identifier: int, workers: int
    ) -> None:
        self.name = target.name
        self.copied: list[str] = []  # keys committed in the target
        self.removed_leftovers: list[str] = []
        self.error: str | None = None  # set once; no object is copied after it
        self._limit = workers * QUEUE_PER_WORKER
        self._pending = 0
        self._closed = False
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"fanout-{target.name}")
        # Opened and checked on the pool, so a target that is slow to answer never delays the
        # backup; the copies queued meanwhile wait for it.
        self._replicator: Future[Replicator | None] = self._pool.submit(
            self._prepare, target, primary, system_identifier, workers
        )

    def offer(self, obj: ObjectEntry) -> None:
        with self._lock:
            if self._closed or self.error is not None or self._pending >= self._limit:
                return  # left to the final copy
            self._pending += 1
            self._pool.submit(self._copy, obj)

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
            leftovers = repo.incomplete()
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

    def _copy(self, obj: ObjectEntry) -> None:
        try:
            replicator = self._replicator.result()
            if replicator is not None and self.error is None:
                replicator.copy_object(obj.key, obj.sha256)
                with self._lock:
                    self.copied.append(obj.key)
        except Exception as exc:  # streaming is an optimisation: the final copy reports
            self._fail(exc)
        finally:
            with self._lock:
                self._pending -= 1

    def _fail(self, exc: Exception) -> None:
        with self._lock:
            if self.error is None:
                self.error = str(exc) if isinstance(exc, DrkitError) else f"unexpected: {exc!r}"
