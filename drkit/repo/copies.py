"""The copy service for 3-2-1: bring every other repository up to date with the primary, verified.

A backup is read from PostgreSQL once, into the primary repository. Copies are made from the
primary's objects — the same encrypted bytes, no re-encryption — in the repository's write order
(data, key records, manifest last), so a copy interrupted at any point is never listed in the
target. Every copied data object is checked against the SHA-256 the manifest recorded for it
(computed while it is written to the target), key records and manifests against the bytes read.
Each completed copy is recorded in the primary as a write-once copy record. WAL objects and WAL
key records are caught up the same way. A backup streams its data objects to the other
repositories while it runs (drkit/repo/fanout.py); its final copy here then skips what is
already there.

This is a service below the operations: ``drkit replicate``, a backup's fan-out and the async
WAL pusher all call ``CopyService.catch_up``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime

from drkit.config.settings import RepoSettings, Settings
from drkit.errors import DrkitError, IntegrityError, LockError
from drkit.repo.label import BackupLabel
from drkit.repo.lease import RepositoryLease, repository_lease
from drkit.repo.open import open_repository, repo_location
from drkit.repo.repository import BACKUP_PREFIX, Repository
from drkit.repo.retention import (
    Decision,
    WalCut,
    backup_facts,
    decide,
    newest_proven,
    policy_from,
)
from drkit.repo.signer import copy_signer
from drkit.repo.wal_names import WAL_PREFIX
from drkit.repo.wal_objects import KEYS_PREFIX

WAL_PREFIXES = (KEYS_PREFIX, WAL_PREFIX)  # key records first: no segment without its key


@dataclass
class RepoReplication:
    repo: str
    copied_backups: list[str] = field(default_factory=list)
    copied_wal: int = 0
    objects: int = 0  # objects of backups copied (data not streamed, key records, manifests)
    bytes: int = 0
    streamed: int = 0  # data objects a backup's fan-out copied while the backup ran
    stream_error: str | None = None  # why the fan-out stopped streaming to this repository
    removed_leftovers: list[str] = field(default_factory=list)  # by a backup's fan-out
    wal_lag: dict[int, int] = field(default_factory=dict)  # timeline -> segments behind
    error: str | None = None  # the repository could not be brought up to date
    locked: bool = False  # because another operation held its lock (retrying later may work)
    lease_taken_over: str | None = None  # the target's lease, expired on another host, was taken


@dataclass
class ReplicationReport:
    repos: list[RepoReplication]

    @property
    def ok(self) -> bool:
        return all(r.error is None for r in self.repos)


class Replicator:
    """Copies objects from the primary repository to one other repository."""

    def __init__(
        self,
        primary: Repository,
        target: Repository,
        workers: int,
        lease: RepositoryLease | None = None,
    ) -> None:
        self.primary = primary
        self.target = target
        self.workers = workers
        self.lease = lease  # the target's lease, checked before a copy is made visible

    def missing_backups(self) -> list[BackupLabel]:
        have = set(self.target.backups())
        return [label for label in self.primary.backups() if label not in have]

    def copy_backup(self, label: BackupLabel) -> tuple[int, int]:
        """Copy one backup, manifest last, except the objects the target already has (streamed
        by the backup's fan-out, or left by an interrupted copy: same key and size); returns
        how many objects and bytes were copied."""
        manifest, _ = self.primary.load_manifest(label)
        copy_signer(self.primary.storage, self.target.storage)  # before any key record
        expected = {o.key: o.sha256 for o in manifest.objects}
        present = {o.key: o.size for o in self.target.storage.list(f"{BACKUP_PREFIX}{label}/")}
        objects = [
            o
            for o in self.primary.storage.list(f"{BACKUP_PREFIX}{label}/")
            if "/verify/" not in o.key and present.get(o.key) != o.size
        ]
        data = [o for o in objects if "/data/" in o.key]
        keys = [o for o in objects if "/key/" in o.key]
        rest = [o for o in objects if o not in data and o not in keys]  # the manifest
        with ThreadPoolExecutor(self.workers, thread_name_prefix="copy") as pool:
            sizes = list(pool.map(lambda o: self._copy(o.key, expected.get(o.key)), data))
        if self.lease is not None:
            self.lease.check()
        sizes += [self._copy(obj.key, None) for obj in keys + rest]
        self.primary.write_copy_record(label, self.target.name)
        return len(sizes), sum(sizes)

    def copy_wal(self, skip: list[WalCut]) -> int:
        """Copy archived WAL and WAL key records the target lacks (except WAL its retention
        policy would prune: ``skip``); returns how many WAL files were copied."""
        copied = 0
        copy_signer(self.primary.storage, self.target.storage)  # before any key record
        for prefix in WAL_PREFIXES:
            present = {o.key for o in self.target.storage.list(prefix)}
            todo = [
                o.key
                for o in self.primary.storage.list(prefix)
                if o.key not in present and not _pruned(o.key, skip)
            ]
            with ThreadPoolExecutor(self.workers, thread_name_prefix="copy") as pool:
                list(pool.map(lambda key: self._copy(key, None), todo))
            copied += len(todo) if prefix == WAL_PREFIX else 0
        return copied

    def wal_lag(self) -> dict[int, int]:
        """Per timeline, how many WAL files the primary has that the target does not."""
        lag: dict[int, int] = {}
        present = {o.key for o in self.target.storage.list(WAL_PREFIX)}
        for obj in self.primary.storage.list(WAL_PREFIX):
            if obj.key not in present:
                timeline = int(obj.key.split("/")[1], 16)
                lag[timeline] = lag.get(timeline, 0) + 1
        return lag

    def _copy(self, key: str, expected_sha256: str | None) -> int:
        """Copy one object, the same bytes, checked: the SHA-256 read from the primary must be
        ``expected_sha256`` (when given) and the target's written SHA-256 the same; returns its
        size. Raises IntegrityError on a mismatch, leaving no copy behind."""
        source_hash = hashlib.sha256()
        with (
            self.primary.storage.open_read(key) as source,
            self.target.storage.open_write(key) as writer,
        ):
            while chunk := source.read(1024 * 1024):
                source_hash.update(chunk)
                writer.write(chunk)
            want = expected_sha256 or source_hash.hexdigest()
            if source_hash.hexdigest() != want:
                writer.abort()
                raise IntegrityError(
                    f"object '{key}' in repository '{self.primary.name}' does not match its"
                    " recorded checksum; not copied",
                    hint="run 'drkit verify' on the primary repository",
                )
            written = writer.commit()
        if written.sha256 != want:
            with suppress(DrkitError):  # never leave a bad copy a later run would skip
                self.target.storage.delete(key)
            raise IntegrityError(f"copy of '{key}' to '{self.target.name}' differs from the source")
        return written.size


def _pruned(key: str, cuts: list[WalCut]) -> bool:
    name = key.rsplit("/", 1)[-1]
    return key.startswith(WAL_PREFIX) and any(cut.covers(name) for cut in cuts)


class CopyService:
    """Catches every other configured repository up with the primary."""

    def __init__(
        self,
        settings: Settings,
        labels: list[BackupLabel] | None = None,
        held_locks: Mapping[str, RepositoryLease | DrkitError] | None = None,
    ) -> None:
        self.settings = settings
        self.labels = labels  # only these backups (the fan-out after a backup); None: all
        # Repositories whose backup lock the caller already holds, with the lease it holds
        # there, or why it could not take that lease (then nothing is copied there now).
        self.held_locks = held_locks or {}

    def catch_up(self) -> ReplicationReport:
        """Copy what each other repository lacks (the ``labels`` only, when given; ``[]``: WAL
        only). A repository that fails is reported in its entry; the others still go on."""
        primary = open_repository(self.settings)
        primary.check()
        report = ReplicationReport([])
        for repo_settings in self.settings.repo[1:]:
            result = RepoReplication(repo_settings.name)
            report.repos.append(result)
            try:
                target = open_repository(self.settings, repo_settings.name)
                with self._lock(repo_settings, target) as lease:
                    if repo_settings.name not in self.held_locks and lease.taken_over:
                        result.lease_taken_over = lease.taken_over.message
                    self._replicate(primary, target, repo_settings, result, lease)
            except DrkitError as exc:
                result.error = str(exc)
                result.locked = isinstance(exc, LockError)
        return report

    def _lock(
        self, settings: RepoSettings, target: Repository
    ) -> AbstractContextManager[RepositoryLease]:
        """The target's backup lock and lease: a prune there, on this host or another, must
        never see a half-copied backup. A backup's fan-out holds them already, from the first
        streamed object to its final copy."""
        held = self.held_locks.get(settings.name)
        if isinstance(held, DrkitError):
            raise held
        if held is not None:
            return nullcontext(held)
        return repository_lease(
            self.settings, target, repo_location(settings), "backup", "replicate"
        )

    def _replicate(
        self,
        primary: Repository,
        target: Repository,
        target_settings: RepoSettings,
        result: RepoReplication,
        lease: RepositoryLease,
    ) -> None:
        """Bring one target up to date; the caller holds the target's backup lock and lease."""
        fmt = primary.check()
        target.check(int(fmt.system_identifier))  # never created here: 'drkit init' does
        replicator = Replicator(primary, target, self.settings.backup.process_max, lease)
        wanted = replicator.missing_backups()
        if self.labels is not None:
            wanted = [label for label in wanted if label in self.labels]
        decision = self._target_policy(primary, target_settings, wanted)
        dropped = set(decision.delete) if decision else set()
        for label in wanted:
            if str(label) in dropped:
                continue  # the target's retention would prune it right away
            objects, size = replicator.copy_backup(label)
            result.objects += objects
            result.bytes += size
            result.copied_backups.append(str(label))
        result.copied_wal = replicator.copy_wal(decision.wal if decision else [])
        result.wal_lag = replicator.wal_lag()

    def _target_policy(
        self, primary: Repository, target: RepoSettings, wanted: list[BackupLabel]
    ) -> Decision | None:
        """What the target's own retention keeps of the primary's backups (None: no policy, or
        nothing to copy — then the manifests need not be read at all)."""
        retention = target.retention or self.settings.retention
        if retention is None or not wanted:
            return None
        facts = [backup_facts(primary, label) for label in primary.backups()]
        timelines = sorted({f.timeline for f in facts})
        proven = newest_proven(e.record for e in primary.drill_records() if e.record is not None)
        return decide(facts, policy_from(retention), datetime.now(UTC), timelines, proven)
