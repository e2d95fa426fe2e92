"""Move every stored data key to the newest key version, and under the escrow key; data untouched.

For each record set (a backup, a WAL key period) whose newest own record is wrapped by the
configured key but not by its newest version, a new record is written: the same DEK, re-wrapped
(by Vault's ``transit/rewrap``, which never reveals the DEK; for KV in memory). When a recovery
key is configured and that record has no escrow part for it, the DEK is escrowed too. Old
records stay as they are (write-once); readers try the records newest first until one
authenticates.

Only a record provably the set's own is rewrapped (``_own_record``): one signed for the set by
the repository's signing key, or an unsigned one whose DEK opens the backup's manifest. A record
someone copied in from another backup, period or cluster unwraps too, and signing or escrowing
its DEK for this set would leave the set with a newest record that authenticates yet opens
nothing: an escrow part is only read on the worst day, it must not be found wrong then.

Sets without such a record (wrapped by another key or provider, or only foreign records) are
reported and left alone. Runs under the repository's ``rewrap`` lock and lease
(drkit/repo/lease.py): a rewrap on another host meanwhile is refused (exit 38), never run twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from drkit.config.settings import Settings
from drkit.crypto.rotation import KeyState
from drkit.crypto.signing import is_signed, open_signer
from drkit.errors import DrkitWarning, IntegrityError, KeyRecordSkipped, WrongKey
from drkit.keys.common import ManagedKeys, open_managed_keys, repositories
from drkit.repo.key_records import RecordSet, StoredRecord, add_record, describe, record_sets
from drkit.repo.label import BackupLabel
from drkit.repo.lease import repository_lease
from drkit.repo.open import repo_location
from drkit.repo.repository import Repository
from drkit.repo.signer import read_signer_object
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
    """What rewrap moved. Warnings: KeyRecordSkipped, one per set left as it is; LeaseTakenOver
    when a repository's rewrap lease, expired on another host, was taken over.
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
        taken: list[DrkitWarning] = []
        with report.phase("rewrap"):
            for repo_settings, repo in repositories(self.settings, keys, self.repo_name):
                scope = repo_location(repo_settings)
                with repository_lease(self.settings, repo, scope, "rewrap", "rewrap") as lease:
                    if lease.taken_over is not None:
                        taken.append(lease.taken_over)
                    for record_set in record_sets(repo):
                        lease.check()
                        self._rewrap_set(repo, record_set, keys, state, report)
        report.warnings = [KeyRecordSkipped(f"skipped {reason}") for reason in report.skipped]
        report.warnings += taken
        return report

    def _rewrap_set(
        self,
        repo: Repository,
        record_set: RecordSet,
        keys: ManagedKeys,
        state: KeyState | None,
        report: RewrapReport,
    ) -> None:
        chosen = _own_record(repo, record_set, keys)
        if isinstance(chosen, str):
            report.skipped.append(f"{repo.name}: {record_set.what}: {chosen}")
            return
        stored, dek, signed = chosen
        record = stored.record
        assert record is not None
        described = describe(record)
        move = (
            state is not None
            and described.version is not None
            and described.version < state.latest_version
        )
        add_escrow = keys.recipient is not None and stored.escrow_recipient != keys.recipient.key_id
        add_signature = not signed
        if not move and not add_escrow and not add_signature:
            report.up_to_date += 1
            return

        # Re-wrap under the newest version; the escrow part, if any, is carried over; the new
        # record is signed for its set (add_record)
        new = keys.versioned.rewrap(record) if move and keys.versioned is not None else dict(record)
        if add_escrow and keys.recipient is not None:
            new["escrow"] = keys.recipient.wrap(dek)

        written = None if self.dry_run else add_record(repo, record_set, new, dek)
        report.rewrapped.append(
            Rewrapped(
                repo=repo.name,
                kind=record_set.kind,
                name=record_set.name,
                old_record=stored.object_key,
                new_record=written,
                from_version=described.version,
                to_version=describe(new).version,
                escrow_added=add_escrow,
                signed=add_signature,
            )
        )


def _own_record(
    repo: Repository, record_set: RecordSet, keys: ManagedKeys
) -> tuple[StoredRecord, bytes, bool] | str:
    """The newest record of ``record_set`` that provably wraps the set's own DEK, with that DEK
    and whether the repository's signing key signed it for the set; or why there is none.
    Anyone who can add objects can copy a genuine record of another backup, period or cluster
    into the set, where it unwraps too: rewrap must never sign or escrow that DEK for this set
    (the set's newest record would then be one that authenticates and opens nothing, and an
    escrow reader would have no other). So a signed record counts only when signed for this set
    by the repository's signing key; an unsigned one (written before signing keys, or signed
    where no signing key can check it yet) only when its DEK opens what the set seals (a
    backup's manifest, the signing key's seed) or, where rewrap has nothing at hand to open (a
    WAL period, a drill record, a note), when every unsigned record of the set unwraps to that
    same DEK."""
    checkable = repo.auth.verifier() is not None
    reasons: list[str] = []
    unsigned: list[tuple[StoredRecord, bytes]] = []
    for stored in reversed(record_set.records):
        record = stored.record
        if record is None:
            reasons.append(f"'{stored.object_key}' is not valid JSON")
            continue
        try:
            described = describe(record)
            if described.provider != keys.base.kind or described.key != keys.key:
                reasons.append(
                    f"wrapped by {described.provider} key '{described.key}', not by the"
                    f" configured key '{keys.key}'"
                )
                continue
            dek = keys.base.unwrap(record)
            if checkable and is_signed(record):
                repo.auth.check_key_record(
                    record, dek, record_set.kind, record_set.name, stored.object_key
                )
                return stored, dek, True
        except (IntegrityError, WrongKey) as exc:  # another set's, another cluster's, damaged
            reasons.append(exc.message)
            continue
        unsigned.append((stored, dek))
    if record_set.kind in ("backup", "signer"):
        for stored, dek in unsigned:
            if _opens(repo, record_set, stored, dek, keys):
                return stored, dek, False
    elif unsigned and len({dek for _, dek in unsigned}) == 1:
        stored, dek = unsigned[0]
        return stored, dek, False
    elif unsigned:
        reasons.append("its unsigned key records unwrap to different data keys")
    if len(reasons) <= 1:
        return reasons[0] if reasons else "no readable key record"
    return "no key record is provably its own: " + "; ".join(reasons)


def _opens(
    repo: Repository, record_set: RecordSet, stored: StoredRecord, dek: bytes, keys: ManagedKeys
) -> bool:
    """Whether ``dek`` opens what ``record_set`` seals: the backup's manifest, or the seed of
    the signing key."""
    try:
        if record_set.kind == "backup":
            repo.load_manifest(BackupLabel(record_set.name), dek)
        else:
            obj = read_signer_object(repo.storage)
            if obj is None:
                return False
            open_signer(obj, stored.record or {}, keys.base, repo.auth.system_identifier())
    except IntegrityError:
        return False
    return True
