"""The repository format on top of a Storage: layout, format object, key records, manifests.

Layout (keys are '/'-separated on every store)::

    drkit-repository.json              format version + system identifier (write-once)
    backup/<label>/data/<nnnnnn>       data objects: bundles of small files or one large file
    backup/<label>/key/<nnnn>.json     key records: the backup's DEK wrapped by the key provider
    backup/<label>/manifest            the encrypted manifest, written last
    copies/<label>/<repository>.json   copy records: the backup was copied to that repository
                                       and verified (written in the primary, drkit/repo/copies.py)
    drills/<id>/key/0001.json          a drill record's DEK, wrapped (drkit/repo/drills.py)
    drills/<id>/record                 the drill record, sealed and bound to its id, written last
    events/<job>/<time>-ok|fail.json   job records: one run of a job (drkit/repo/events.py)
    notes/<id>/key/0001.json           a finding's or sign-off's DEK, wrapped (drkit/repo/notes.py)
    notes/<id>/record                  the note, sealed and bound to its id, written last

Write order is data -> key record -> manifest; a backup is listed exactly when its manifest
exists, so a backup killed at any instant is never listed. The catalog is derived by listing.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ValidationError

from drkit import __version__
from drkit.codec.frame_reader import unseal
from drkit.codec.frame_writer import seal
from drkit.crypto.base import KeyProvider
from drkit.errors import (
    BackupNotFound,
    DrkitError,
    IntegrityError,
    ObjectExists,
    ObjectNotFound,
    RepositoryError,
    WrongKey,
    repository_missing,
)
from drkit.repo.drills import (
    DRILL_PREFIX,
    DrillEntry,
    DrillRecord,
    SealedDrillRecord,
    drill_key_record_key,
    drill_record_key,
    is_drill_id,
    seal_drill_record,
    unseal_drill_record,
)
from drkit.repo.identity import check_identity
from drkit.repo.label import BackupLabel
from drkit.repo.manifest import Manifest
from drkit.repo.signer import RecordAuth
from drkit.storage.base import Storage

FORMAT_KEY = "drkit-repository.json"
FORMAT_VERSION = 1
BACKUP_PREFIX = "backup/"
COPY_PREFIX = "copies/"


class RepositoryFormat(BaseModel):
    format: int
    system_identifier: str
    created: datetime
    created_by: str


# Position of each kind of object of a backup in deletion order (the reverse of write order).
_DELETE_ORDER = {"manifest": 0, "verify": 1, "key": 2, "data": 3}


@contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: for code that builds many objects without cycles,
    which the collector would otherwise scan again and again as they pile up."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def file_context(label: str, path: str) -> bytes:
    """Binds a file's frame to the backup and path it belongs to."""
    return f"file:{label}:{path}".encode()


def manifest_context(label: str) -> bytes:
    return f"manifest:{label}".encode()


class Repository:
    def __init__(self, storage: Storage, keys: KeyProvider) -> None:
        self.storage = storage
        self.keys = keys
        self.auth = RecordAuth(storage, keys)  # signs what this writes, checks what it reads
        self._system_identifier: str | None = None  # of the format object, read once

    @property
    def name(self) -> str:
        return self.storage.name

    # -- layout -------------------------------------------------------------------------------

    @staticmethod
    def data_key(label: BackupLabel, index: int) -> str:
        return f"{BACKUP_PREFIX}{label}/data/{index:06d}"

    @staticmethod
    def manifest_key(label: BackupLabel) -> str:
        return f"{BACKUP_PREFIX}{label}/manifest"

    @staticmethod
    def key_record_key(label: BackupLabel, seq: int) -> str:
        return f"{BACKUP_PREFIX}{label}/key/{seq:04d}.json"

    # -- format object ------------------------------------------------------------------------

    def initialize(self, system_identifier: int) -> bool:
        """Create the format object; returns False when the repository already exists for this
        cluster (idempotent), raises when it belongs to another cluster."""
        if self.storage.exists(FORMAT_KEY):
            self.check(system_identifier)
            return False
        fmt = RepositoryFormat(
            format=FORMAT_VERSION,
            system_identifier=str(system_identifier),
            created=datetime.now(UTC),
            created_by=f"drkit {__version__}",
        )
        self.storage.write_bytes(FORMAT_KEY, fmt.model_dump_json(indent=2).encode())
        return True

    def check(
        self, system_identifier: int | None = None, *, reading: bool = False
    ) -> RepositoryFormat:
        """Read the format object; refuse unknown formats and other clusters' repositories, and
        a repository that is not there (RepositoryMissing; ``reading``: the caller only reads,
        so the hint does not suggest creating one)."""
        try:
            raw = self.storage.read_bytes(FORMAT_KEY)
        except ObjectNotFound:
            raise repository_missing(self.name, self.storage.location, reading=reading) from None
        try:
            fmt = RepositoryFormat.model_validate_json(raw)
        except ValidationError:
            raise RepositoryError(f"repository '{self.name}' has a damaged format object") from None
        if fmt.format != FORMAT_VERSION:
            raise RepositoryError(
                f"repository '{self.name}' has format {fmt.format}; this drkit reads format"
                f" {FORMAT_VERSION}",
                hint="use the drkit version that wrote it (see its created_by field)",
            )
        if system_identifier is not None and fmt.system_identifier != str(system_identifier):
            raise RepositoryError(
                f"repository '{self.name}' belongs to database system {fmt.system_identifier},"
                f" not to this cluster ({system_identifier})",
                hint="each cluster needs its own repository (path or S3 prefix)",
            )
        return fmt

    # -- catalog ------------------------------------------------------------------------------

    def _labels(self) -> dict[str, set[str]]:
        """label -> set of object kinds present ('manifest', 'data', 'key')."""
        found: dict[str, set[str]] = {}
        for obj in self.storage.list(BACKUP_PREFIX):
            parts = obj.key.split("/")
            if len(parts) >= 3 and BackupLabel.is_label(parts[1]):
                found.setdefault(parts[1], set()).add(parts[2])
        return found

    def backups(self) -> list[BackupLabel]:
        """Complete backups (those with a manifest), oldest first."""
        return sorted(BackupLabel(k) for k, kinds in self._labels().items() if "manifest" in kinds)

    def incomplete(self) -> list[BackupLabel]:
        """Labels with objects but no manifest: leftovers of a killed or failed backup."""
        return sorted(
            BackupLabel(k) for k, kinds in self._labels().items() if "manifest" not in kinds
        )

    def label_in_use(self, label: BackupLabel) -> bool:
        return bool(self.storage.list(f"{BACKUP_PREFIX}{label}/"))

    def resolve(self, wanted: str | None) -> BackupLabel:
        """'latest' / None -> newest complete backup; otherwise that label, which must exist."""
        labels = self.backups()
        if wanted in (None, "latest"):
            if not labels:
                raise BackupNotFound(
                    f"repository '{self.name}' holds no backups",
                    hint="take one with 'drkit backup --type full'",
                )
            return labels[-1]
        assert wanted is not None
        if not BackupLabel.is_label(wanted) or BackupLabel(wanted) not in labels:
            raise BackupNotFound(
                f"backup '{wanted}' does not exist in repository '{self.name}'",
                hint="'drkit info' lists the backups",
            )
        return BackupLabel(wanted)

    def delete_objects(self, label: BackupLabel) -> int:
        """Delete every object of ``label`` in the reverse of write order: manifest, records,
        key records, data. A deletion killed midway leaves an unlisted leftover, never a
        listed backup with missing objects."""
        keys = [o.key for o in self.storage.list(f"{BACKUP_PREFIX}{label}/")]
        keys.sort(key=lambda k: (_DELETE_ORDER.get(k.split("/")[2], 1), k))
        for key in keys:
            self.storage.delete(key)
        return len(keys)

    def deletion_order(self, label: BackupLabel) -> list[str]:
        """Every object of a backup that is no longer listed (its manifest gone), in the order
        prune deletes them: the copy and verification records written after its manifest, then
        its key records, then its data. Data goes last so that until the very end the backup's
        directory shows the leftover to the next run."""
        keys = [o.key for o in self.storage.list(f"{COPY_PREFIX}{label}/")]
        backup = [o.key for o in self.storage.list(f"{BACKUP_PREFIX}{label}/")]
        return keys + sorted(backup, key=lambda k: ("/data/" in k, "/key/" in k, k))

    def delete(self, key: str) -> None:
        """Delete one object (ObjectLocked while a retention lock protects it)."""
        self.storage.delete(key)

    # -- copy records ---------------------------------------------------------------------------

    def write_copy_record(self, label: BackupLabel, target: str) -> None:
        """Record (write-once, kept if there) that ``label`` was copied to repository ``target``
        and verified."""
        record = {"repo": target, "verified": True, "time": datetime.now(UTC).isoformat()}
        key = f"{COPY_PREFIX}{label}/{target}.json"
        if not self.storage.exists(key):
            self.storage.write_bytes(key, json.dumps(self.auth.signed_object(record, key)).encode())

    # -- verification records -------------------------------------------------------------------

    def write_verify_record(self, label: BackupLabel, ok: bool, damaged: int) -> None:
        """Record a verification result (write-once, one per run) so later backups can tell."""
        now = datetime.now(UTC)
        key = f"{BACKUP_PREFIX}{label}/verify/{now.strftime('%Y%m%dT%H%M%S.%fZ')}.json"
        record = {"ok": ok, "damaged_files": damaged, "time": now.isoformat()}
        self.storage.write_bytes(key, json.dumps(self.auth.signed_object(record, key)).encode())

    def verify_records(self, label: BackupLabel) -> list[tuple[str, dict[str, Any] | None]]:
        """Each verification record of ``label``, oldest first, as (object key, record); the
        record is None when it is not signed by the repository's signing key (forged, or
        damaged): such a record is never believed, whatever it says."""
        found: list[tuple[str, dict[str, Any] | None]] = []
        for obj in self.storage.list(f"{BACKUP_PREFIX}{label}/verify/"):
            try:
                payload = json.loads(self.storage.read_bytes(obj.key))
            except (json.JSONDecodeError, UnicodeDecodeError):
                payload = None
            authentic = self.auth.authentic_object(payload, obj.key)
            found.append((obj.key, payload if authentic else None))
        return found

    def unauthentic_verify_records(self, label: BackupLabel) -> list[str]:
        """The verification records of ``label`` newer than its newest authentic one that are
        not authentic: those a reader that trusted them would have believed."""
        found: list[str] = []
        for key, record in reversed(self.verify_records(label)):
            if record is not None:
                break
            found.append(key)
        return found[::-1]

    def verified_ok(self, label: BackupLabel) -> bool:
        """False when the newest authentic verification of ``label`` found damage (True if
        never run); records that are not authentic are passed over."""
        for _, record in reversed(self.verify_records(label)):
            if record is not None:
                return record.get("ok") is True
        return True

    # -- keys and manifests -------------------------------------------------------------------

    def write_key_record(self, label: BackupLabel, record: dict[str, Any], dek: bytes) -> str:
        """Store ``record`` (which wraps ``dek``), signed for ``label``, as the backup's next key
        record (0001.json, then 0002.json after a rewrap, ...). Write-once: an existing record
        is never replaced; a concurrent writer of the same number makes this raise ObjectExists."""
        record = self.auth.sign_key_record(record, dek, "backup", str(label))
        seqs = [
            int(name[:-5])
            for o in self.storage.list(f"{BACKUP_PREFIX}{label}/key/")
            if (name := o.key.rsplit("/", 1)[-1]).endswith(".json") and name[:-5].isdigit()
        ]
        key = self.key_record_key(label, max(seqs, default=0) + 1)
        self.storage.write_bytes(key, json.dumps(record, sort_keys=True, indent=2).encode())
        return key

    def load_dek(self, label: BackupLabel) -> bytes:
        """Unwrap the backup's DEK from its newest key record that unwraps."""
        return next(self._unwrap_each(f"{BACKUP_PREFIX}{label}/key/", "backup", str(label)))

    def record_dek(self, prefix: str, kind: str, name: str) -> bytes:
        """The DEK of a sealed record (``kind`` "drill" or "note", id ``name``) whose key
        records are under ``prefix``."""
        return next(self._unwrap_each(prefix, kind, name))

    def _unwrap_each(self, prefix: str, kind: str, name: str) -> Iterator[bytes]:
        """The DEK of each key record under ``prefix`` that unwraps and is authentic for
        ``kind``/``name`` (``RecordAuth.check_key_record``), newest first, each DEK once; raises
        the last error when none is. A caller that can authenticate what the DEK opens tries
        each in turn: a record added beside the genuine one (another backup's, copied) may
        unwrap too, to the wrong key, and must not hide the genuine one."""
        owner = {"backup": "backup", "drill": "drill record", "note": "note"}[kind]
        owner = f"{owner} '{name}'"
        records = sorted((o.key for o in self.storage.list(prefix)), reverse=True)
        if not records:
            raise IntegrityError(f"{owner} has no key record in repository '{self.name}'")
        error: DrkitError | None = None
        seen: set[bytes] = set()
        for key in records:
            try:
                record = json.loads(self.storage.read_bytes(key))
                dek = self.keys.unwrap(record)
                self.auth.check_key_record(record, dek, kind, name, key)
            except json.JSONDecodeError:
                error = IntegrityError(f"key record '{key}' is not valid JSON")
                continue
            except DrkitError as exc:
                error = exc
                continue
            if dek not in seen:
                seen.add(dek)
                yield dek
        if not seen:
            assert error is not None
            raise error

    def write_manifest(self, manifest: Manifest, dek: bytes) -> None:
        label = BackupLabel(manifest.label)
        blob = seal(manifest.model_dump_json().encode(), dek, manifest_context(manifest.label))
        self.storage.write_bytes(self.manifest_key(label), blob)

    def load_manifest(self, label: BackupLabel, dek: bytes | None = None) -> tuple[Manifest, bytes]:
        """Decrypt and parse the manifest of ``label``; returns it with the backup's DEK."""
        blob = self.storage.read_bytes(self.manifest_key(label))
        plain, dek = self._open_manifest(label, blob, dek)
        try:
            with _collector_paused():  # a tree of many small objects, without one cycle
                manifest = Manifest.model_validate_json(plain)
        except ValidationError as exc:
            raise IntegrityError(f"manifest of backup '{label}' does not parse: {exc}") from None
        self._check_cluster(label, manifest)
        return manifest, dek

    def _open_manifest(
        self, label: BackupLabel, blob: bytes, dek: bytes | None
    ) -> tuple[bytes, bytes]:
        """The manifest's plaintext and the DEK that opened it: ``dek`` when given, else the
        first of the backup's key records, newest first, whose DEK authenticates it."""
        candidates = (
            iter([dek])
            if dek
            else self._unwrap_each(f"{BACKUP_PREFIX}{label}/key/", "backup", str(label))
        )
        failure: IntegrityError | None = None
        for candidate in candidates:
            try:
                return unseal(blob, candidate, manifest_context(str(label))), candidate
            except IntegrityError as exc:
                failure = failure or exc
        assert failure is not None
        raise IntegrityError(f"manifest of backup '{label}' is damaged: {failure}")

    def _check_cluster(self, label: BackupLabel, manifest: Manifest) -> None:
        """A backup of another cluster never passes for one of this repository's: with a key
        shared between clusters, its host could otherwise plant backups here."""
        if self._system_identifier is None:
            self._system_identifier = self.check(reading=True).system_identifier
        if manifest.system_identifier != self._system_identifier:
            raise IntegrityError(
                f"backup '{label}' in repository '{self.name}' is of database system"
                f" {manifest.system_identifier}, but the repository belongs to database system"
                f" {self._system_identifier}",
                hint="a backup of another cluster was put into this repository; it is never"
                " restored: remove it, and give each cluster its own key (docs/vault.md)",
            )

    # -- drill records --------------------------------------------------------------------------

    def write_drill_record(self, record: DrillRecord | SealedDrillRecord) -> None:
        """Store a drill record under ``drills/<id>/``: its key record, then the sealed record
        last, so a write killed midway leaves nothing listed. Write-once: raises ObjectExists
        when the id holds anything already, WrongKey when the repository was initialised with
        another key than ``keys``. A DrillRecord is sealed here with a fresh data key;
        a SealedDrillRecord (the same bytes for every repository) is stored as it is."""
        check_identity(self.storage, self.keys)  # never seal with a key the repository refuses
        if isinstance(record, DrillRecord):
            record = seal_drill_record(record, self.keys, self.auth)
        if self.storage.list(f"{DRILL_PREFIX}{record.id}/"):
            raise ObjectExists(
                f"drill record '{record.id}' already exists in repository '{self.name}'",
                hint="a drill record is written once; every drill has its own id",
            )
        self.storage.write_bytes(drill_key_record_key(record.id), record.key_record)
        self.storage.write_bytes(drill_record_key(record.id), record.sealed)

    def drill_objects(self) -> dict[str, list[str]]:
        """Every object under ``drills/`` by drill id (records and leftovers of interrupted
        writes alike), each id's objects in the order prune deletes them: the record first,
        then its key records."""
        found: dict[str, list[str]] = {}
        for obj in self.storage.list(DRILL_PREFIX):
            parts = obj.key.split("/")
            if len(parts) >= 3:
                found.setdefault(parts[1], []).append(obj.key)
        return {
            drill_id: sorted(keys, key=lambda k: (not k.endswith("/record"), k))
            for drill_id, keys in sorted(found.items())
        }

    def drill_ids(self) -> list[str]:
        """Ids under ``drills/`` that hold a written record, oldest first."""
        ids = set()
        for obj in self.storage.list(DRILL_PREFIX):
            parts = obj.key.split("/")
            if len(parts) == 3 and parts[2] == "record":
                ids.add(parts[1])
        return sorted(ids)

    def drill_record(self, drill_id: str) -> DrillEntry:
        """The record of one drill, or why it cannot be trusted (damaged, moved from another
        id, sealed with another key, key record missing). A key provider that cannot be
        reached at all raises: that says nothing about the record."""
        if not is_drill_id(drill_id):
            return DrillEntry(drill_id, error=f"'{drill_id}' is not a drill id")
        failure: DrkitError | None = None
        try:
            sealed = self.storage.read_bytes(drill_record_key(drill_id))
            # every record that unwraps, until one opens the record (see _unwrap_each)
            for dek in self._unwrap_each(f"{DRILL_PREFIX}{drill_id}/key/", "drill", drill_id):
                try:
                    return DrillEntry(drill_id, unseal_drill_record(drill_id, sealed, dek))
                except IntegrityError as exc:
                    failure = failure or exc
        except (IntegrityError, WrongKey, ObjectNotFound) as exc:
            failure = exc
        assert failure is not None
        return DrillEntry(drill_id, error=failure.message)

    def last_drill(self) -> DrillEntry | None:
        """The newest drill record that authenticates (read newest first: one unwrap when the
        newest is sound); None when there is none."""
        for drill_id in reversed(self.drill_ids()):
            entry = self.drill_record(drill_id)
            if entry.authentic:
                return entry
        return None

    def drill_records(self) -> list[DrillEntry]:
        """Every drill record, oldest first; one that fails authentication or parsing is listed
        with its error, never dropped."""
        return [self.drill_record(drill_id) for drill_id in self.drill_ids()]
