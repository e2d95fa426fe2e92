"""Move every stored data key to the newest key version, and under the escrow key; data untouched.

For each record set (a backup, a WAL key period) whose newest record is wrapped by the configured
key but not by its newest version, a new record is written: the same DEK, re-wrapped (by Vault's
``transit/rewrap``, which never reveals the DEK; for KV in memory). When a recovery key is
configured and the newest record has no escrow part for it, the DEK is unwrapped and escrowed
too. Old records stay as they are (write-once); readers take the newest record that unwraps.

Before a record with a new escrow part is stored for a backup, the DEK is proven right by
decrypting the backup's manifest with it: an escrow part is only read on the worst day, it must
not be found wrong then.

Records wrapped by another key or provider are reported and left alone. Runs under the
repository's ``rewrap`` lock and lease (drkit/repo/lease.py), so a rewrap on another host waits
its turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from drkit.config.settings import Settings
from drkit.crypto.rotation import KeyState
from drkit.crypto.signing import is_signed
from drkit.errors import IntegrityError, KeyRecordSkipped
from drkit.keys.common import ManagedKeys, open_managed_keys, repositories
from drkit.repo.key_records import RecordSet, add_record, describe, record_sets
from drkit.repo.label import BackupLabel
from drkit.repo.lease import repository_lease
from drkit.repo.open import repo_location
from drkit.repo.repository import Repository
from drkit.result import OperationResult


@dataclass
class Rewrapped:
    repo: str
    kind: str
    name: str
    old_record: str
    new_record: str | None  # None in a dry run
    from_version: int | None
    to_version: int | None
    escrow_added: bool
    signed: bool = False  # the set had no signed record: this one is signed

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RewrapReport(OperationResult):
    """What rewrap moved. Warnings: KeyRecordSkipped, one per set left as it is.
    ``phases``: rewrap (every selected repository)."""

    key: str
    latest_version: int | None
    dry_run: bool
    rewrapped: list[Rewrapped] = field(default_factory=list)
    up_to_date: int = 0
    skipped: list[str] = field(default_factory=list)  # sets this provider cannot rewrap, why

    def _data(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "latest_version": self.latest_version,
            "dry_run": self.dry_run,
            "rewrapped": [r.as_dict() for r in self.rewrapped],
            "up_to_date": self.up_to_date,
            "skipped": self.skipped,
        }


class RewrapOperation:
    def __init__(self, settings: Settings, repo: str | None = None, dry_run: bool = False) -> None:
        self.settings = settings
        self.repo_name = repo
        self.dry_run = dry_run

    def run(self) -> RewrapReport:
        keys = open_managed_keys(self.settings)
        state = keys.versioned.key_state() if keys.versioned is not None else None
        if state is None and keys.recipient is None:
            keys.require_versioned("rewrap to")  # nothing to move to: say so
        report = RewrapReport(keys.key, state.latest_version if state else None, self.dry_run)
        with report.phase("rewrap"):
            for repo_settings, repo in repositories(self.settings, keys, self.repo_name):
                scope = repo_location(repo_settings)
                with repository_lease(self.settings, repo, scope, "rewrap", "rewrap") as lease:
                    for record_set in record_sets(repo):
                        lease.check()
                        self._rewrap_set(repo, record_set, keys, state, report)
        report.warnings = [KeyRecordSkipped(f"skipped {reason}") for reason in report.skipped]
        return report

    def _rewrap_set(
        self,
        repo: Repository,
        record_set: RecordSet,
        keys: ManagedKeys,
        state: KeyState | None,
        report: RewrapReport,
    ) -> None:
        newest = record_set.newest()
        if newest is None or newest.record is None:
            report.skipped.append(f"{repo.name}: {record_set.what}: no readable key record")
            return
        record = newest.record
        described = describe(record)
        if described.provider != keys.base.kind or described.key != keys.key:
            report.skipped.append(
                f"{repo.name}: {record_set.what}: wrapped by {described.provider} key "
                f"'{described.key}', not by the configured key '{keys.key}'"
            )
            return
        move = (
            state is not None
            and described.version is not None
            and described.version < state.latest_version
        )
        add_escrow = keys.recipient is not None and newest.escrow_recipient != keys.recipient.key_id
        add_signature = not is_signed(record)
        if not move and not add_escrow and not add_signature:
            report.up_to_date += 1
            return

        # Re-wrap under the newest version; the escrow part, if any, is carried over; the new
        # record is signed for its set (add_record)
        new = keys.versioned.rewrap(record) if move and keys.versioned is not None else dict(record)
        dek = keys.base.unwrap(new)
        if (add_escrow or add_signature) and record_set.kind == "backup":
            self._prove_dek(repo, BackupLabel(record_set.name), dek)
        if add_escrow and keys.recipient is not None:
            new["escrow"] = keys.recipient.wrap(dek)

        stored = None if self.dry_run else add_record(repo, record_set, new, dek)
        report.rewrapped.append(
            Rewrapped(
                repo=repo.name,
                kind=record_set.kind,
                name=record_set.name,
                old_record=newest.object_key,
                new_record=stored,
                from_version=described.version,
                to_version=describe(new).version,
                escrow_added=add_escrow,
                signed=add_signature,
            )
        )

    @staticmethod
    def _prove_dek(repo: Repository, label: BackupLabel, dek: bytes) -> None:
        try:
            repo.load_manifest(label, dek)
        except IntegrityError as exc:
            raise IntegrityError(
                f"the data key of backup '{label}' does not decrypt its manifest, so it is not "
                f"escrowed: {exc}"
            ) from None
