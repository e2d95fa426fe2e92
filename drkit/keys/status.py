"""Which wrapping keys and key versions a repository's backups and WAL still depend on.

For each record set (a backup, a WAL key period) the newest record decides: it is what readers
unwrap first, and after ``drkit keys rewrap`` it is on the newest version. The oldest version any
set still needs is the highest ``min_decryption_version`` that keeps every backup readable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from drkit.config.settings import Settings
from drkit.crypto.signing import is_signed
from drkit.errors import IntegrityError
from drkit.keys.common import KeyVersions, open_managed_keys, repositories
from drkit.repo.key_records import RecordSet, describe, record_sets
from drkit.result import OperationResult


@dataclass
class SetStatus:
    repo: str
    kind: str  # "backup", "wal", "drill", "note" or "signer" (the signing key's records)
    name: str
    record: str | None  # object key of the newest record
    records: int
    provider: str | None
    key: str | None
    version: int | None
    escrow: str | None  # recipient key id of the newest record's escrow part
    problem: str | None = None
    signed: bool = False  # the newest record carries a signature (docs/security.md)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(kw_only=True)
class KeysStatus(KeyVersions, OperationResult):
    """The key record sets of the selected repositories and the key versions they need.
    ``phases``: sets (read every key record set)."""

    escrow: str | None  # the configured recovery key id
    sets: list[SetStatus] = field(default_factory=list)

    def is_ours(self, s: SetStatus) -> bool:
        """Whether the set's newest record is wrapped by the configured key."""
        return s.provider == self.provider and s.key == self.key

    @property
    def ours(self) -> list[SetStatus]:
        return [s for s in self.sets if self.is_ours(s)]

    @property
    def other_keys(self) -> list[SetStatus]:
        return [s for s in self.sets if not self.is_ours(s)]

    @property
    def versions_needed(self) -> dict[int, int]:
        """version -> number of sets whose newest record is on it."""
        counts: dict[int, int] = {}
        for s in self.ours:
            if s.version is not None:
                counts[s.version] = counts.get(s.version, 0) + 1
        return dict(sorted(counts.items()))

    @property
    def oldest_needed(self) -> int | None:
        return min(self.versions_needed, default=None)

    @property
    def may_raise_to(self) -> int | None:
        """The highest min_decryption_version that keeps everything readable."""
        if self.latest_version is None:
            return None
        return self.oldest_needed or self.latest_version

    @property
    def without_escrow(self) -> list[SetStatus]:
        if self.escrow is None:
            return []
        return [s for s in self.sets if s.escrow != self.escrow]

    @property
    def unsigned(self) -> list[SetStatus]:
        """Sets whose newest record is not signed: a restore with the recovery key alone
        refuses them ('drkit keys rewrap' signs them)."""
        return [s for s in self.sets if s.record is not None and not s.signed]

    def _data(self) -> dict[str, Any]:
        return {
            **super()._data(),
            "versions_needed": {str(k): v for k, v in self.versions_needed.items()},
            "oldest_needed_version": self.oldest_needed,
            "may_raise_min_decryption_version_to": self.may_raise_to,
            "escrow": self.escrow,
            "without_escrow": len(self.without_escrow),
            "unsigned": len(self.unsigned),
            "other_keys": len(self.other_keys),
            "sets": [s.as_dict() for s in self.sets],
        }


class KeyStatusOperation:
    def __init__(self, settings: Settings, repo: str | None = None) -> None:
        self.settings = settings
        self.repo_name = repo

    def run(self) -> KeysStatus:
        keys = open_managed_keys(self.settings)
        state = keys.versioned.key_state() if keys.versioned is not None else None
        status = KeysStatus(
            provider=keys.base.kind,
            key=keys.key,
            latest_version=state.latest_version if state else None,
            min_decryption_version=state.min_decryption_version if state else None,
            escrow=keys.recipient.key_id if keys.recipient else None,
        )
        with status.phase("sets"):
            for repo_settings, repo in repositories(self.settings, keys, self.repo_name):
                for record_set in record_sets(repo):
                    status.sets.append(_set_status(repo_settings.name, record_set))
        return status


def _set_status(repo: str, record_set: RecordSet) -> SetStatus:
    newest = record_set.newest()
    status = SetStatus(
        repo,
        record_set.kind,
        record_set.name,
        None,
        len(record_set.records),
        None,
        None,
        None,
        None,
    )
    if newest is None or newest.record is None:
        status.problem = "no readable key record"
        return status
    status.record = newest.object_key
    status.escrow = newest.escrow_recipient
    status.signed = is_signed(newest.record)
    try:
        described = describe(newest.record)
    except IntegrityError as exc:
        status.problem = str(exc)
        return status
    status.provider, status.key, status.version = (
        described.provider,
        described.key,
        described.version,
    )
    return status
