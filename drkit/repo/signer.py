"""The repository's signing key in use: signing what drkit writes, checking what it reads.

``drkit-signer.json`` (write-once, plain JSON) holds the repository's signing key
(``crypto/signing.py``): its public key and fingerprint in clear, its private seed sealed under a
DEK of the key provider. Every repository of a cluster holds the same one: ``init`` writes it to
each, the copy service copies it before any key record, and a writer that finds none (a
repository made before signing keys existed) makes it.

Who trusts what:
- a writer (backup, wal-push starting a period, drills, notes, rewrap, verify and copy records)
  unseals the seed with the key provider; an object it cannot unseal was planted, and the writer
  refuses to go on (IntegrityError) instead of signing under a key it cannot vouch for;
- a reader with the key provider checks signed records against the object's public key (a record
  moved to another backup, period or repository fails); unsigned records, written before signing
  keys existed, are accepted: the provider's wrap already proves who made them;
- a reader with only the recovery key (``RecoveryProvider``) has nothing but signatures to tell a
  genuine record from one made with public material: it requires every key record to be signed by
  the repository's signing key, whose fingerprint must be one its escrow kit pins when the kit
  pins any (``[keys.escrow] signers``); unsigned records only with ``[keys.escrow]
  accept_unsigned`` (a repository not yet migrated by ``drkit keys rewrap``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import suppress
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from drkit.codec.frame_reader import unseal
from drkit.codec.frame_writer import seal
from drkit.crypto.base import KeyProvider
from drkit.crypto.recovery import RecoveryProvider
from drkit.crypto.signing import Signer, SignerPublic, is_signed, new_signer, open_signer
from drkit.crypto.signing import signer_public as parse_signer
from drkit.errors import (
    ConfigError,
    DrkitError,
    IntegrityError,
    KeyMaterialError,
    ObjectExists,
    ObjectNotFound,
    RepositoryError,
    WrongKey,
)
from drkit.repo.identity import check_identity
from drkit.storage.base import Storage

log = logging.getLogger(__name__)
_RECORD_KEY_INFO = b"drkit-sealed-records-v1"
_RACE_WAIT = 5.0  # seconds a writer waits for a concurrent writer's signer object
SIGNER_KEY = "drkit-signer.json"
SIGNER_RECORDS = "signer/key/"  # key records of the DEK that seals the signing key's seed
FORMAT_KEY = "drkit-repository.json"
MIGRATE_HINT = (
    "run 'drkit keys rewrap' while the key provider works: it signs every key record; until"
    " then [keys.escrow] accept_unsigned = true reads unsigned records with the recovery key"
)


class RecordAuth:
    """Signs and checks the records of one repository; reads the signer object once."""

    def __init__(self, storage: Storage, keys: KeyProvider) -> None:
        self.storage = storage
        self.keys = keys
        self.escrow_only = isinstance(keys, RecoveryProvider)
        self._pinned = keys.signers if isinstance(keys, RecoveryProvider) else frozenset()
        self._accept_unsigned = not self.escrow_only or (
            isinstance(keys, RecoveryProvider) and keys.accept_unsigned
        )
        self._lock = threading.Lock()
        self._loaded = False
        self._verifier: SignerPublic | None = None
        self._signer: Signer | None = None
        self._system_identifier: str | None = None

    # -- what readers check -------------------------------------------------------------------

    def check_key_record(
        self, record: dict[str, Any], dek: bytes, kind: str, name: str, key: str = ""
    ) -> None:
        """Raises IntegrityError unless ``record`` (stored at ``key``, unwrapped to ``dek``) is
        one this reader may trust for ``kind``/``name`` (see the module docstring)."""
        where = f"'{key}' " if key else ""
        what = f"key record {where}of {_noun(kind)} '{name}'"
        verifier = self.verifier()
        if not is_signed(record):
            if self._accept_unsigned:
                return
            raise IntegrityError(
                f"{what} is not signed: with the recovery key alone it cannot be told from one"
                " made with the public escrow key",
                hint=MIGRATE_HINT,
            )
        if verifier is None:
            if self.escrow_only:
                raise IntegrityError(
                    f"{what} is signed, but repository '{self.storage.name}' has no signing key"
                    f" object '{SIGNER_KEY}'"
                )
            return  # the provider's wrap vouches for it; the signature cannot be checked
        verifier.check_key_record(record, dek, self.system_identifier(), kind, name, what)

    def authentic_object(self, payload: object, key: str) -> bool:
        """Whether a plain JSON record (verify record, copy record) stored at ``key`` carries the
        repository's signature. A repository without a signing key has only unsigned records,
        which are then taken as they are (readers with the recovery key excepted)."""
        if not isinstance(payload, dict):
            return False
        try:
            verifier = self.verifier()
        except IntegrityError:
            return False
        if verifier is None:
            return not self.escrow_only and not is_signed(payload)
        try:
            verifier.check_object(payload, self.system_identifier(), key)
        except IntegrityError:
            return False
        return True

    def verifier(self) -> SignerPublic | None:
        """The public signing key readers check against; None for a repository without one.
        Raises IntegrityError when the object is damaged or not the one the escrow kit pins."""
        with self._lock:
            if not self._loaded:
                obj = read_signer_object(self.storage)
                self._verifier = None if obj is None else parse_signer(obj)
                self._loaded = True
            verifier = self._verifier
        if self._pinned:
            if verifier is None:
                raise IntegrityError(
                    f"repository '{self.storage.name}' has no signing key object, but the escrow"
                    " kit pins one ([keys.escrow] signers)",
                    hint="the object was removed, or this is not the repository the kit is for",
                )
            if verifier.fingerprint not in self._pinned:
                raise IntegrityError(
                    f"repository '{self.storage.name}' has signing key {verifier.fingerprint},"
                    " which the escrow kit does not pin ([keys.escrow] signers): the object was"
                    " replaced",
                    hint="restore from a copy whose signing key the kit names",
                )
        return verifier

    # -- what writers sign ----------------------------------------------------------------------

    def sign_key_record(
        self, record: dict[str, Any], dek: bytes, kind: str, name: str
    ) -> dict[str, Any]:
        return self.signer().sign_key_record(record, dek, self.system_identifier(), kind, name)

    def signed_object(self, payload: dict[str, Any], key: str) -> dict[str, Any]:
        """``payload``, a plain record to store at ``key``, signed. A reader with the recovery
        key alone signs only when the signing key is escrowed to it; otherwise the record is
        stored unsigned, which every reader of a repository with a signing key ignores."""
        try:
            signer = self.signer()
        except (ConfigError, WrongKey, KeyMaterialError):
            if not self.escrow_only:
                raise
            log.warning("record '%s' is stored unsigned: the signing key is not escrowed", key)
            return payload
        return signer.sign_object(payload, self.system_identifier(), key)

    def seal(self, payload: bytes, key: str) -> bytes:
        """``payload`` sealed (a frame, AES-GCM) for the object ``key``, under a key derived
        from the signing key: for small records written often (job records), which a data key
        from the key provider each would make costly. Readers need the signing key too."""
        return seal(payload, self._record_key(), f"record:{key}".encode())

    def unseal(self, blob: bytes, key: str) -> bytes:
        """The payload ``seal`` sealed for ``key``; IntegrityError when it was not (forged,
        damaged, moved from another key)."""
        return unseal(blob, self._record_key(), f"record:{key}".encode())

    def _record_key(self) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_RECORD_KEY_INFO).derive(
            self.signer().seed
        )

    def signer(self) -> Signer:
        """The signing key, unsealed with the key provider (made and stored when the repository
        has none). Raises IntegrityError when the stored one was not made with this provider."""
        with self._lock:
            if self._signer is None:
                self._signer = self._open_or_create()
            return self._signer

    def _open_or_create(self) -> Signer:
        check_identity(self.storage, self.keys)  # WrongKey: the configured key is not ours
        obj = read_signer_object(self.storage)
        if obj is None:
            signer, obj, record = new_signer(self.keys, self.system_identifier())
            name = signer.verifier.fingerprint
            signed = signer.sign_key_record(
                record, self.keys.unwrap(record), self.system_identifier(), "signer", name
            )
            try:  # its key record, then the object: the object is never there without it
                self.storage.write_bytes(
                    f"{SIGNER_RECORDS}0001.json", json.dumps(signed, indent=2).encode()
                )
                self.storage.write_bytes(SIGNER_KEY, json.dumps(obj, indent=2).encode())
                self._verifier, self._loaded = signer.verifier, True
                return signer
            except ObjectExists:  # another process is making it: use theirs
                obj = self._wait_for_object()
        failure: DrkitError | None = None
        for key in sorted((o.key for o in self.storage.list(SIGNER_RECORDS)), reverse=True):
            try:
                record = json.loads(self.storage.read_bytes(key))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            try:
                # a record of another key than the repository's (writers checked the identity)
                self.keys.check_key(record)
            except WrongKey as exc:
                failure = failure or IntegrityError(exc.message)
                continue
            try:
                signer = open_signer(obj, record, self.keys, self.system_identifier())
            except DrkitError as exc:
                failure = failure or exc
                continue
            self._verifier, self._loaded = signer.verifier, True
            return signer
        if failure is None or isinstance(failure, IntegrityError):
            reason = failure.message if failure else "no key record opens it"
            raise IntegrityError(
                f"repository '{self.storage.name}': signing key: {reason}; nothing is signed"
                " with it",
                hint=f"'{SIGNER_KEY}' was not made with the configured key: someone who lacks"
                " the key planted it; compare it with the one in the other repositories",
            )
        raise failure

    def _wait_for_object(self) -> dict[str, Any]:
        """The signer object another process is writing right now (its key record is there, the
        object follows at once): polled for up to ``_RACE_WAIT`` seconds."""
        deadline = time.monotonic() + _RACE_WAIT
        while (obj := read_signer_object(self.storage)) is None:
            if time.monotonic() > deadline:
                raise IntegrityError(
                    f"repository '{self.storage.name}' has a key record of a signing key under"
                    f" '{SIGNER_RECORDS}' but no '{SIGNER_KEY}'",
                    hint="a process making the signing key was killed between its two writes:"
                    f" remove '{SIGNER_RECORDS}' (it seals nothing yet) and run again",
                )
            time.sleep(0.05)
        return obj

    def system_identifier(self) -> str:
        if self._system_identifier is None:
            try:
                fmt = json.loads(self.storage.read_bytes(FORMAT_KEY))
                self._system_identifier = str(fmt["system_identifier"])
            except (ObjectNotFound, json.JSONDecodeError, KeyError, TypeError):
                raise RepositoryError(
                    f"repository '{self.storage.name}' has no readable format object"
                ) from None
        return self._system_identifier


def read_signer_object(storage: Storage) -> dict[str, Any] | None:
    """The stored signer object; None when the repository has none. IntegrityError when it is
    not JSON."""
    try:
        raw = storage.read_bytes(SIGNER_KEY)
    except ObjectNotFound:
        return None
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise IntegrityError(f"signing key object '{SIGNER_KEY}' is not valid JSON") from None
    if not isinstance(obj, dict):
        raise IntegrityError(f"signing key object '{SIGNER_KEY}' is malformed")
    return obj


def copy_signer(source: Storage, target: Storage) -> None:
    """Gives ``target`` the signing key of ``source`` (its key records, then the object) when it
    has none: the same bytes, as a repository and its copies share one signing key. Key records
    a rewrap added to the source later are copied too."""
    if not source.exists(SIGNER_KEY):
        return
    have = {o.key for o in target.list(SIGNER_RECORDS)}
    for obj in source.list(SIGNER_RECORDS):
        if obj.key not in have:
            with suppress(ObjectExists):  # a concurrent copy wrote the same object
                target.write_bytes(obj.key, source.read_bytes(obj.key))
    if not target.exists(SIGNER_KEY):
        with suppress(ObjectExists):
            target.write_bytes(SIGNER_KEY, source.read_bytes(SIGNER_KEY))


def _noun(kind: str) -> str:
    nouns = {"backup": "backup", "wal": "WAL period", "drill": "drill record", "note": "note"}
    return nouns.get(kind, "signing key")


def first_signing(auths: list[RecordAuth]) -> RecordAuth:
    """The first of ``auths`` (one per repository, in configured order) whose signing key can be
    had, for a record written to every repository (drill records, notes): it is signed once and
    each repository lacking a signing key gets this one (``copy_signer``). Raises the first
    repository's error when none can sign."""
    first: Exception | None = None
    for auth in auths:
        try:
            auth.signer()
        except DrkitError as exc:
            first = first or exc
            continue
        return auth
    assert first is not None
    raise first
