"""Repository leases: one writer of a kind at a time per repository, whichever host it runs on.

The host-local lock (drkit/repo/lock.py) keeps two processes of one host apart, but a second host
with the same configuration (a standby that took over, an admin host running prune) sees none
of it, and would delete the first host's backup in progress as a leftover. So every operation
that writes or deletes backups (backup and its fan-out, prune, replicate, key rewrap) also holds
a lease kept in the repository itself::

    leases/<scope>/<generation, 12 digits>.json

Each generation is a write-once object; the newest one is the lease's state. Taking, renewing
and releasing the lease each write the next generation with a *conditional create* (posix
``link(2)``, S3 ``If-None-Match: *``): of two hosts that both see the lease free, exactly one
writes the next generation and the other is told the lease is held. A holder whose renewal finds
the next generation taken knows it lost the lease. Older generations are deleted after each
write (under Object Lock they are written to be retained only until shortly after they expire).

A lease is free when its newest generation is released, when it expired more than ``grace``
ago (``grace`` covers the clock difference between hosts), or when it was held on this very
host by a process that no longer runs (a kill -9: taken over at once, as the flock is). The
holder renews it every third of ``ttl`` from a background thread and checks it (`check`)
before each step that makes something visible or deletes something: past its expiry by its
own clock it stops, before any other host may take over.

Records are plain JSON naming host, pid, operation and times: nothing secret. Someone who can
write to the repository can block or free a lease, as they could delete objects anyway.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from drkit.config.lease import LeaseSettings
from drkit.config.settings import Settings
from drkit.errors import (
    DrkitError,
    LeaseHeld,
    LeaseLost,
    LeaseTakenOver,
    ObjectExists,
    ObjectNotFound,
)
from drkit.repo.label import BackupLabel
from drkit.repo.lock import operation_lock
from drkit.repo.repository import Repository
from drkit.storage.base import Storage

log = logging.getLogger(__name__)

LEASE_PREFIX = "leases/"
MAX_RECORD_BYTES = 4096  # a record is ~300 bytes; anything larger is not one of ours
_GENERATION = re.compile(r"^(\d{12})\.json$")
TAKEN_OVER_HINT = (
    "check that host; its incomplete backups are removed once older than [lease] leftover_age"
)

Clock = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class LeaseRecord:
    """One generation of a lease: who holds it (host, pid, operation, a token per tenure) and
    until when; ``released`` once the holder let it go."""

    scope: str
    generation: int
    host: str
    pid: int
    operation: str
    token: str
    acquired: datetime
    expires: datetime
    released: bool = False

    @property
    def key(self) -> str:
        return lease_key(self.scope, self.generation)

    def describe(self) -> str:
        return (
            f"{self.operation} on host '{self.host}' (pid {self.pid}) since"
            f" {self.acquired.isoformat(timespec='seconds')}, lease until"
            f" {self.expires.isoformat(timespec='seconds')}"
        )

    def encode(self) -> bytes:
        data: dict[str, Any] = dict(self.__dict__)
        data["acquired"] = self.acquired.isoformat()
        data["expires"] = self.expires.isoformat()
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes, key: str) -> LeaseRecord:
        try:
            data = json.loads(raw)
            record = cls(
                scope=str(data["scope"]),
                generation=int(data["generation"]),
                host=str(data["host"]),
                pid=int(data["pid"]),
                operation=str(data["operation"]),
                token=str(data["token"]),
                acquired=_aware(data["acquired"]),
                expires=_aware(data["expires"]),
                released=bool(data["released"]),
            )
        except (ValueError, KeyError, TypeError):
            raise LeaseHeld(
                f"the lease record '{key}' is not one drkit wrote",
                hint="nothing else may write below 'leases/'; remove the object once no drkit"
                " operation runs against this repository",
            ) from None
        if record.key != key:
            raise LeaseHeld(f"the lease record '{key}' names generation {record.generation}")
        return record


def _aware(text: str) -> datetime:
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        raise ValueError("naive time")
    return when


def lease_key(scope: str, generation: int) -> str:
    return f"{LEASE_PREFIX}{scope}/{generation:012d}.json"


def lease_generations(storage: Storage, scope: str) -> list[tuple[int, str]]:
    """Every stored generation of ``scope``'s lease as (generation, key), oldest first."""
    found = []
    for obj in storage.list(f"{LEASE_PREFIX}{scope}/"):
        match = _GENERATION.match(obj.key.rsplit("/", 1)[-1])
        if match and obj.key.count("/") == 2:
            found.append((int(match.group(1)), obj.key))
    return sorted(found)


def current_lease(storage: Storage, scope: str) -> LeaseRecord | None:
    """The newest generation of ``scope``'s lease, or None when it was never taken."""
    generations = lease_generations(storage, scope)
    if not generations:
        return None
    _, key = generations[-1]
    try:
        raw = storage.read_bytes(key, 0, MAX_RECORD_BYTES + 1)
    except ObjectNotFound:  # deleted by a newer holder's clean-up meanwhile: look again
        return current_lease(storage, scope)
    if len(raw) > MAX_RECORD_BYTES:
        raise LeaseHeld(f"the lease record '{key}' is larger than any drkit writes")
    return LeaseRecord.decode(raw, key)


def live_holder(storage: Storage, scope: str, settings: LeaseSettings) -> LeaseRecord | None:
    """The holder of ``scope``'s lease when it is live as this host judges it (see
    `RepositoryLease`), else None. Reads only; for reports such as ``drkit info``."""
    record = current_lease(storage, scope)
    if record is None or not _live(record, settings, _utcnow()):
        return None
    return record


def _live(record: LeaseRecord, settings: LeaseSettings, now: datetime) -> bool:
    if record.released:
        return False
    if record.host == settings.host and not _running(record.pid):
        return False  # killed on this host: nothing of it runs any more
    return now <= record.expires + settings.grace


class RepositoryLease:
    """``scope``'s lease in one repository, held by this process for ``operation``.

    `acquire` takes it (LeaseHeld when it is not free), a daemon thread renews it, `check`
    raises LeaseLost once it can no longer be trusted, `release` lets it go. ``previous`` is
    the generation found when it was taken, and `may_remove` says whether an incomplete backup
    may belong to a holder that could still be writing.
    """

    def __init__(
        self,
        storage: Storage,
        scope: str,
        operation: str,
        settings: LeaseSettings,
        clock: Clock = _utcnow,
    ) -> None:
        self.storage = storage
        self.scope = scope
        self.operation = operation
        self.settings = settings
        self.clock = clock
        self.previous: LeaseRecord | None = None
        self.taken_over: LeaseTakenOver | None = None  # set when another host's lease expired
        self._record: LeaseRecord | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._mutex = threading.Lock()

    # -- taking and letting go ---------------------------------------------------------------

    def acquire(self) -> None:
        now = self.clock()
        previous = current_lease(self.storage, self.scope)
        if previous is not None and _live(previous, self.settings, now):
            raise self._held_error(previous)
        if previous is not None and not previous.released and previous.host != self.settings.host:
            self.taken_over = LeaseTakenOver(
                f"took over the {self.scope} lease of repository '{self.storage.name}' from"
                f" {previous.describe()}, which expired without being released",
                hint=TAKEN_OVER_HINT,
            )
        record = LeaseRecord(
            scope=self.scope,
            generation=(previous.generation + 1) if previous else 1,
            host=self.settings.host,
            pid=os.getpid(),
            operation=self.operation,
            token=secrets.token_hex(8),
            acquired=now,
            expires=now + self.settings.ttl,
        )
        try:
            self._write(record)
        except ObjectExists:  # another host took it between our look and our write
            raise self._held_error(current_lease(self.storage, self.scope) or record) from None
        self.previous = previous
        self._record = record
        self._clean_up(record.generation)
        if self.taken_over is not None:
            log.warning(self.taken_over.message)
        self._renewer = threading.Thread(
            target=self._renew_loop, name=f"drkit-lease-{self.scope}", daemon=True
        )
        self._renewer.start()

    def release(self) -> None:
        """Write the released generation (best effort: a lease that cannot be released simply
        expires) and stop renewing."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        with self._mutex:
            record = self._record
            if record is None or self._lost is not None:
                return
            released = LeaseRecord(
                **{**record.__dict__, "generation": record.generation + 1, "released": True}
            )
            try:
                self._write(released)
            except DrkitError as exc:
                log.warning(f"could not release the {self.scope} lease: {exc} (it expires)")
                return
            self._record = None
        self._clean_up(released.generation)

    # -- while held --------------------------------------------------------------------------

    def check(self) -> None:
        """Raise LeaseLost unless the lease is still ours and unexpired by our own clock."""
        with self._mutex:
            record = self._record
            if self._lost is None and record is not None and self.clock() >= record.expires:
                self._lost = (
                    f"it expired at {record.expires.isoformat(timespec='seconds')}"
                    " without being renewed"
                )
            lost = self._lost
        if lost is not None:
            raise LeaseLost(
                f"the {self.scope} lease of repository '{self.storage.name}' was lost: {lost}",
                hint="the repository was unreachable for longer than [lease] ttl, or this"
                " process was paused; run the operation again",
            )

    def renew(self) -> None:
        """Write the next generation with a later expiry (LeaseLost if another took it)."""
        with self._mutex:
            record = self._record
            if record is None or self._lost is not None:
                return
            now = self.clock()
            if now >= record.expires:
                self._lost = "it expired before it could be renewed"
                return
            renewed = LeaseRecord(
                **{
                    **record.__dict__,
                    "generation": record.generation + 1,
                    "expires": now + self.settings.ttl,
                }
            )
            try:
                self._write(renewed)
            except ObjectExists:
                self._lost = "another host took it over"
                return
            self._record = renewed
        self._clean_up(renewed.generation)

    def may_remove(self, label: BackupLabel) -> bool:
        """Whether the objects of an incomplete backup may go: always, unless the lease was
        taken over from another host whose holder may still be writing, then only those older
        than ``leftover_age``."""
        if self.taken_over is None:
            return True
        return label.time < self.clock() - self.settings.leftover_age

    # -- internals ---------------------------------------------------------------------------

    def _held_error(self, record: LeaseRecord) -> LeaseHeld:
        return LeaseHeld(
            f"another {record.operation} holds the {self.scope} lease of repository"
            f" '{self.storage.name}': {record.describe()}",
            hint="wait for it to finish; a lease that is not renewed is free"
            f" {self.settings.grace.total_seconds():.0f}s after it expires",
        )

    def _write(self, record: LeaseRecord) -> None:
        data = record.encode()
        if self.storage.capabilities.object_lock:
            # Retained only until shortly after it expires, so superseded generations can go:
            # the bucket's retention is for backups, not for bookkeeping.
            until = record.expires + self.settings.grace + timedelta(minutes=1)
            cast(Any, self.storage).write_bytes(record.key, data, retain_until=until)
        else:
            self.storage.write_bytes(record.key, data)

    def _clean_up(self, newest: int) -> None:
        with contextlib.suppress(DrkitError):  # best effort: the next holder tries again
            for generation, key in lease_generations(self.storage, self.scope):
                if generation < newest:
                    self.storage.delete(key)

    def _renew_loop(self) -> None:
        interval = self.settings.ttl.total_seconds() / 3
        while not self._stop.wait(interval):
            try:
                self.renew()
            except DrkitError as exc:  # tried again next time; expiry is the limit
                log.warning(f"could not renew the {self.scope} lease: {exc}")
            with self._mutex:
                if self._lost is not None:
                    return


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    return True


@contextmanager
def repository_lease(
    settings: Settings, repo: Repository, location: str, scope: str, operation: str
) -> Iterator[RepositoryLease]:
    """Hold this host's lock and the repository's lease for ``scope`` (``location``: the
    repository's location, naming the host-local lock). The repository must exist: a lease is
    never the first object written to a place (an unmounted directory, a wrong prefix)."""
    with operation_lock(settings.lock_path, location, scope):
        repo.check()
        lease = RepositoryLease(repo.storage, scope, operation, settings.lease)
        lease.acquire()
        try:
            yield lease
        finally:
            lease.release()
