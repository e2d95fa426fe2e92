"""The key record sets of a repository, and what each record says about its wrapping key.

A *set* is every record of one backup, one WAL key period, one drill record or one note: all
wrap the same DEK, the newest is the one readers try first. Parsing a record needs no key and no
Vault: the provider kind, key name and version are in clear in the record (transit's version in
its ``vault:v<N>:`` prefix).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from drkit.crypto.base import KeyProvider
from drkit.crypto.escrow import EscrowingProvider, EscrowRecipient
from drkit.crypto.transit import ciphertext_version
from drkit.repo.drills import DRILL_PREFIX
from drkit.repo.label import BackupLabel
from drkit.repo.notes import NOTE_PREFIX, note_ids
from drkit.repo.repository import BACKUP_PREFIX, Repository
from drkit.repo.signer import SIGNER_RECORDS, read_signer_object
from drkit.repo.wal_objects import KEYS_PREFIX


@dataclass(frozen=True)
class RecordKey:
    """Which key wrapped a record: provider kind, key name, version (None: unversioned)."""

    provider: str
    key: str
    version: int | None


@dataclass(frozen=True)
class StoredRecord:
    object_key: str  # where it is stored
    seq: int
    record: dict[str, Any] | None  # None: not valid JSON (damaged)

    @property
    def escrow_recipient(self) -> str | None:
        part = (self.record or {}).get("escrow")
        return str(part.get("recipient")) if isinstance(part, dict) else None


@dataclass
class RecordSet:
    """The records of one backup (``kind == "backup"``), one WAL key period (``"wal"``), one
    drill record (``"drill"``), one note (``"note"``) or the signing key (``"signer"``)."""

    kind: str
    name: str  # the backup label or the period
    prefix: str
    records: list[StoredRecord] = field(default_factory=list)  # oldest first

    @property
    def what(self) -> str:
        noun = {
            "backup": "backup",
            "wal": "WAL period",
            "drill": "drill record",
            "note": "note",
            "signer": "signing key",
        }
        return f"{noun[self.kind]} {self.name}"

    def newest(self) -> StoredRecord | None:
        """The newest record that parses (what readers try first, in effect)."""
        for stored in reversed(self.records):
            if stored.record is not None:
                return stored
        return None


def describe(record: dict[str, Any]) -> RecordKey:
    """The key a record names. Raises IntegrityError for a malformed transit ciphertext."""
    provider = str(record.get("provider"))
    if provider == "vault-transit":
        name = f"{record.get('mount')}/{record.get('key')}"
        return RecordKey(provider, name, ciphertext_version(record.get("ciphertext")))
    if provider == "vault-kv":
        name = f"{record.get('mount')}/{record.get('path')}#{record.get('field')}"
        version = record.get("version")
        return RecordKey(provider, name, version if isinstance(version, int) else None)
    return RecordKey(provider, str(record.get("key_id")), None)


def configured_key(provider: KeyProvider) -> str:
    """The name ``describe`` gives the key of ``provider`` (a provider without escrow)."""
    name = getattr(provider, "name", None) or getattr(provider, "key_id", None)
    return str(name)


def split_escrow(provider: KeyProvider) -> tuple[KeyProvider, EscrowRecipient | None]:
    """The configured provider without its escrow wrapper, and the escrow recipient if any."""
    if isinstance(provider, EscrowingProvider):
        return provider.inner, provider.recipient
    return provider, None


def record_sets(repo: Repository) -> list[RecordSet]:
    """The record sets of every complete backup, every WAL key period and every written drill
    record, in listing order."""
    complete = {
        "backup": {str(label) for label in repo.backups()},
        "drill": set(repo.drill_ids()),
        "note": set(note_ids(repo)),
    }
    sets: dict[str, RecordSet] = {}
    kinds = (
        (BACKUP_PREFIX, "backup"),
        (KEYS_PREFIX, "wal"),
        (DRILL_PREFIX, "drill"),
        (NOTE_PREFIX, "note"),
    )
    for prefix, kind in kinds:
        for obj in repo.storage.list(prefix):
            parts = obj.key[len(prefix) :].split("/")
            if kind in complete:
                if len(parts) != 3 or parts[1] != "key" or parts[0] not in complete[kind]:
                    continue
                name, file = parts[0], parts[2]
                set_prefix = f"{prefix}{name}/key/"
            else:
                if len(parts) != 2:
                    continue
                name, file = parts
                set_prefix = f"{KEYS_PREFIX}{name}/"
            seq = _seq(file)
            if seq is None:
                continue
            entry = sets.setdefault(set_prefix, RecordSet(kind, name, set_prefix))
            entry.records.append(StoredRecord(obj.key, seq, _read(repo, obj.key)))
    signer = read_signer_object(repo.storage)
    if signer is not None:
        entry = RecordSet("signer", str(signer.get("signer")), SIGNER_RECORDS)
        for obj in repo.storage.list(SIGNER_RECORDS):
            seq = _seq(obj.key.rsplit("/", 1)[-1])
            if seq is not None:
                entry.records.append(StoredRecord(obj.key, seq, _read(repo, obj.key)))
        sets[SIGNER_RECORDS] = entry
    for entry in sets.values():
        entry.records.sort(key=lambda r: r.seq)
    return sorted(sets.values(), key=lambda s: (s.kind, s.name))


def add_record(repo: Repository, target: RecordSet, record: dict[str, Any], dek: bytes) -> str:
    """Stores ``record`` (which wraps ``dek``), signed for its set, as the set's next record
    (write-once); returns its object key."""
    if target.kind == "backup":
        return repo.write_key_record(BackupLabel(target.name), record, dek)
    signed = repo.auth.sign_key_record(record, dek, target.kind, target.name)
    seq = max((r.seq for r in target.records), default=0) + 1
    key = f"{target.prefix}{seq:04d}.json"
    repo.storage.write_bytes(key, json.dumps(signed, sort_keys=True, indent=2).encode())
    return key


def _seq(file: str) -> int | None:
    stem, dot, ext = file.partition(".")
    return int(stem) if dot and ext == "json" and stem.isdigit() else None


def _read(repo: Repository, key: str) -> dict[str, Any] | None:
    try:
        value = json.loads(repo.storage.read_bytes(key))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None
