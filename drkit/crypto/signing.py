"""Who made a key record: the repository's signing key.

A key record proves that its DEK came from the key provider only to a reader that unwraps it
with that provider. The escrow part proves nothing: the recovery public key is on every host, so
whoever can add objects to a repository can wrap a DEK of their own to it and seal a backup, a
WAL key period or a drill record with it, which ``--recovery-key`` would open. Every key record
drkit writes therefore carries a signature (``record["auth"]``) from the repository's signing key,
an Ed25519 key whose private half is sealed in the repository under a DEK from the key provider
(and escrowed like any DEK), and whose public half any reader checks against: an escrow reader
against the fingerprint its escrow kit pins (``[keys.escrow] signers``), or the repository's
write-once signer object.

The signature covers a commitment to the DEK (HKDF of it: it reveals nothing of the DEK), the
cluster's system identifier, which every copy of a repository shares, and what the record is
for (``backup``/label, ``wal``/period, ``drill``/id, ``note``/id): a record moved to another
backup, period or repository no longer verifies, and one made with public material never does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from drkit.crypto.base import KeyProvider, decode_field
from drkit.errors import IntegrityError

AUTH_VERSION = 1
SIGNER_VERSION = 1
_ID_PREFIX = b"drkit-signer-id\x00"
_COMMIT_INFO = b"drkit-key-commit-v1"
_RECORD_PREFIX = b"drkit-key-record-v1\x00"
_OBJECT_PREFIX = b"drkit-record-v1\x00"
_SEAL_PREFIX = b"drkit-signer-v1\x00"
_WHAT = "repository signing key"


def fingerprint(public: bytes) -> str:
    """The public fingerprint of a signing key (32 hex characters, 128 bits: what an escrow kit
    pins, so no second key can be ground to match it)."""
    return hashlib.sha256(_ID_PREFIX + public).hexdigest()[:32]


def commitment(dek: bytes) -> bytes:
    """A value bound to ``dek`` that reveals nothing of it."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_COMMIT_INFO).derive(dek)


def _record_message(system_identifier: str, kind: str, name: str, commit: bytes) -> bytes:
    return _RECORD_PREFIX + "\x00".join((system_identifier, kind, name)).encode() + b"\x00" + commit


def _object_message(system_identifier: str, key: str, payload: dict[str, Any]) -> bytes:
    body = {k: v for k, v in payload.items() if k != "auth"}
    canonical = _canonical(body)
    return _OBJECT_PREFIX + f"{system_identifier}\x00{key}\x00".encode() + canonical


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class SignerPublic:
    """The public half: verifies what the repository's signing key signed."""

    public: bytes
    fingerprint: str

    @classmethod
    def from_bytes(cls, public: bytes) -> SignerPublic:
        return cls(public, fingerprint(public))

    def check_key_record(
        self,
        record: dict[str, Any],
        dek: bytes,
        system_identifier: str,
        kind: str,
        name: str,
        what: str = "key record",
    ) -> None:
        """Raises IntegrityError unless ``record`` carries this key's signature over ``dek`` for
        ``kind``/``name`` of the cluster ``system_identifier``; ``what`` names it in errors."""
        auth = _auth(record, self.fingerprint, what)
        commit = decode_field(auth, "commit", f"{what} signature")
        if commit != commitment(dek):
            raise IntegrityError(f"{what} is signed for another data key")
        self._verify(auth, _record_message(system_identifier, kind, name, commit), what)

    def check_object(self, payload: dict[str, Any], system_identifier: str, key: str) -> None:
        """Raises IntegrityError unless the plain JSON record ``payload`` stored at ``key`` is
        signed by this key."""
        auth = _auth(payload, self.fingerprint, what="record")
        self._verify(auth, _object_message(system_identifier, key, payload), f"record '{key}'")

    def _verify(self, auth: dict[str, Any], message: bytes, what: str) -> None:
        signature = decode_field(auth, "signature", f"{what} signature")
        try:
            Ed25519PublicKey.from_public_bytes(self.public).verify(signature, message)
        except InvalidSignature:
            raise IntegrityError(
                f"{what} is not signed by the repository's signing key {self.fingerprint}"
                " (forged, or moved from another backup, period or repository)"
            ) from None


@dataclass(frozen=True)
class Signer:
    """The private half: signs the key records and plain records drkit writes."""

    seed: bytes = field(repr=False)
    verifier: SignerPublic

    @classmethod
    def from_seed(cls, seed: bytes) -> Signer:
        public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
        return cls(seed, SignerPublic.from_bytes(public))

    def _sign(self, message: bytes) -> str:
        signature = Ed25519PrivateKey.from_private_bytes(self.seed).sign(message)
        return base64.b64encode(signature).decode("ascii")

    def sign_key_record(
        self, record: dict[str, Any], dek: bytes, system_identifier: str, kind: str, name: str
    ) -> dict[str, Any]:
        """``record`` with its signature (``auth``) for ``kind``/``name``."""
        commit = commitment(dek)
        message = _record_message(system_identifier, kind, name, commit)
        auth = {
            "version": AUTH_VERSION,
            "signer": self.verifier.fingerprint,
            "commit": base64.b64encode(commit).decode("ascii"),
            "signature": self._sign(message),
        }
        return {**{k: v for k, v in record.items() if k != "auth"}, "auth": auth}

    def sign_object(
        self, payload: dict[str, Any], system_identifier: str, key: str
    ) -> dict[str, Any]:
        """The plain JSON record ``payload``, to be stored at ``key``, with its signature."""
        auth = {
            "version": AUTH_VERSION,
            "signer": self.verifier.fingerprint,
            "signature": self._sign(_object_message(system_identifier, key, payload)),
        }
        return {**payload, "auth": auth}


def new_signer(
    provider: KeyProvider, system_identifier: str
) -> tuple[Signer, dict[str, Any], dict[str, Any]]:
    """A fresh signing key, the signer object that stores it (the public key in clear, the
    private seed sealed under a fresh DEK of ``provider``) and that DEK's key record (escrowed
    like any; a rewrap adds records of it)."""
    seed = os.urandom(32)
    signer = Signer.from_seed(seed)
    data_key = provider.new_data_key()
    nonce = os.urandom(12)
    aad = _seal_aad(system_identifier, signer.verifier.public)
    sealed = AESGCM(data_key.plaintext).encrypt(nonce, seed, aad)
    obj = {
        "version": SIGNER_VERSION,
        "signer": signer.verifier.fingerprint,
        "public_key": base64.b64encode(signer.verifier.public).decode("ascii"),
        "nonce": base64.b64encode(nonce).decode("ascii"),
        "sealed": base64.b64encode(sealed).decode("ascii"),
    }
    return signer, obj, data_key.record


def signer_public(obj: object) -> SignerPublic:
    """The public key a signer object names; IntegrityError when it is malformed."""
    if not isinstance(obj, dict) or obj.get("version") != SIGNER_VERSION:
        raise IntegrityError(f"{_WHAT} object is malformed or of an unknown version")
    public = decode_field(obj, "public_key", _WHAT)
    if len(public) != 32:
        raise IntegrityError(f"{_WHAT} object is malformed: the public key is not 32 bytes")
    verifier = SignerPublic.from_bytes(public)
    if obj.get("signer") != verifier.fingerprint:
        raise IntegrityError(f"{_WHAT} object is malformed: its fingerprint does not match")
    return verifier


def open_signer(
    obj: dict[str, Any], record: dict[str, Any], provider: KeyProvider, system_identifier: str
) -> Signer:
    """The signing key of a signer object, unsealed with the DEK ``provider`` unwraps from
    ``record``. Raises WrongKey or KeyMaterialError like ``unwrap``, IntegrityError when the
    object was not made with that DEK for this cluster (planted by someone who lacks the key)."""
    verifier = signer_public(obj)
    dek = provider.unwrap(record)
    nonce = decode_field(obj, "nonce", _WHAT)
    try:
        seed = AESGCM(dek).decrypt(
            nonce,
            decode_field(obj, "sealed", _WHAT),
            _seal_aad(system_identifier, verifier.public),
        )
    except (InvalidTag, ValueError):
        raise IntegrityError(f"{_WHAT} failed authentication (the object was forged)") from None
    signer = Signer.from_seed(seed)
    if signer.verifier != verifier:
        raise IntegrityError(f"{_WHAT} does not match its public key (the object was forged)")
    return signer


def _seal_aad(system_identifier: str, public: bytes) -> bytes:
    return _SEAL_PREFIX + system_identifier.encode() + b"\x00" + public


def _auth(record: dict[str, Any], expected: str, what: str = "key record") -> dict[str, Any]:
    auth = record.get("auth")
    if not isinstance(auth, dict) or auth.get("version") != AUTH_VERSION:
        raise IntegrityError(f"{what} is not signed")
    if auth.get("signer") != expected:
        raise IntegrityError(
            f"{what} is signed by signing key {auth.get('signer')!r}, not by the repository's"
            f" signing key {expected}"
        )
    return auth


def is_signed(record: dict[str, Any]) -> bool:
    return isinstance(record.get("auth"), dict)
