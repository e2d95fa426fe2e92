"""Key provider backed by a key-encryption key (KEK) kept in a Vault KV v2 secret.

For sites that cannot use Transit: a field of a KV v2 secret holds a base64-encoded 256-bit KEK.
drkit reads it, generates each DEK locally and wraps it with AES-256-GCM under the KEK, like the
key file provider. Because KV v2 keeps versions, the record stores the version it was wrapped
with and unwrapping reads exactly that version: writing a new KEK (``drkit keys rotate``) leaves
old backups readable as long as their version is kept (not destroyed) in Vault.

The KEK passes through drkit's memory, unlike a transit key; it is cached per version for the
life of the process and never written anywhere.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import threading
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from drkit.crypto.base import DEK_SIZE, OTHER_PROVIDER_HINT, DataKey, check_provider, decode_field
from drkit.crypto.escrow import TAMPERED_HINT
from drkit.crypto.rotation import KeyState
from drkit.crypto.vault import VaultRequestError, VaultSession
from drkit.errors import IntegrityError, KeyMaterialError, VaultError, WrongKey

PROVIDER = "vault-kv"
KEK_SIZE = 32
NONCE_SIZE = 12
_KEY_ID_PREFIX = b"drkit-vault-kv-id\x00"
_WRAP_AAD_PREFIX = b"drkit-dek-v1\x00vault-kv\x00"


def kek_id(kek: bytes) -> str:
    """The public fingerprint of a KEK (16 hex characters)."""
    return hashlib.sha256(_KEY_ID_PREFIX + kek).hexdigest()[:16]


class VaultKvProvider:
    """Data keys wrapped locally under a KEK read from a versioned KV v2 secret."""

    kind = PROVIDER

    def __init__(self, session: VaultSession, mount: str, path: str, field: str) -> None:
        self.session = session
        self.mount = mount.strip("/")
        self.path = path.strip("/")
        self.field = field
        self.name = f"{self.mount}/{self.path}#{self.field}"
        self._keks: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"VaultKvProvider(addr={self.session.addr!r}, key={self.name!r})"

    # -- KeyProvider ------------------------------------------------------------------------------

    def new_data_key(self) -> DataKey:
        version, kek = self._read_kek(None)
        dek = os.urandom(DEK_SIZE)
        return DataKey(plaintext=dek, record=self._wrap(dek, version, kek))

    def unwrap(self, record: dict[str, Any]) -> bytes:
        version = self._check_record(record)
        key_id = record.get("key_id")
        _, kek = self._read_kek(version)
        if key_id != kek_id(kek):
            raise WrongKey(
                f"data key was wrapped by KEK {key_id}, but version {version} of '{self.name}' "
                f"holds KEK {kek_id(kek)} (the secret was deleted and written anew?)",
                hint="restore from the escrow with --recovery-key",
            )
        nonce, wrapped = decode_field(record, "nonce"), decode_field(record, "wrapped")
        if len(nonce) != NONCE_SIZE:
            raise IntegrityError(f"key record is malformed: nonce is {len(nonce)} bytes")
        try:
            dek = AESGCM(kek).decrypt(nonce, wrapped, _aad(version, str(key_id)))
        except InvalidTag:
            raise IntegrityError(
                "wrapped data key failed authentication (tampered key record)",
                hint=TAMPERED_HINT,
            ) from None
        if len(dek) != DEK_SIZE:
            raise IntegrityError(f"key record unwraps to {len(dek)} bytes, not a data key")
        return dek

    # -- rotation ---------------------------------------------------------------------------------

    def key_state(self) -> KeyState:
        metadata = self._call(
            "read", f"metadata/{self.path}", None, f"read the versions of KV secret '{self.name}'"
        )
        return KeyState(PROVIDER, self.name, int(metadata["current_version"]))

    def rotate(self) -> KeyState:
        """Writes a new KEK as a new version of the secret (check-and-set on the current version,
        so a concurrent writer is not overwritten); the secret's other fields are kept."""
        current = self._call("read", f"data/{self.path}", None, f"read KV secret '{self.name}'")
        fields = dict(current.get("data") or {})
        version = int((current.get("metadata") or {})["version"])
        fields[self.field] = base64.b64encode(os.urandom(KEK_SIZE)).decode("ascii")
        self._call(
            "write",
            f"data/{self.path}",
            {"data": fields, "options": {"cas": version}},
            f"write a new KEK to KV secret '{self.name}'",
        )
        return self.key_state()

    def rewrap(self, record: dict[str, Any]) -> dict[str, Any]:
        """Unwraps with the record's KEK version and wraps again under the newest one; this
        happens in drkit's memory (KV has no server-side rewrap)."""
        dek = self.unwrap(record)
        version, kek = self._read_kek(None)
        rewrapped = {**record, **self._wrap(dek, version, kek)}
        if self.unwrap(rewrapped) != dek:  # a KEK that changed between reads
            raise IntegrityError(f"rewrapping under '{self.name}' did not round-trip")
        return rewrapped

    # -- internals --------------------------------------------------------------------------------

    def _wrap(self, dek: bytes, version: int, kek: bytes) -> dict[str, Any]:
        key_id = kek_id(kek)
        nonce = os.urandom(NONCE_SIZE)
        wrapped = AESGCM(kek).encrypt(nonce, dek, _aad(version, key_id))
        return {
            "provider": PROVIDER,
            "mount": self.mount,
            "path": self.path,
            "field": self.field,
            "version": version,
            "key_id": key_id,
            "nonce": base64.b64encode(nonce).decode("ascii"),
            "wrapped": base64.b64encode(wrapped).decode("ascii"),
        }

    def _read_kek(self, version: int | None) -> tuple[int, bytes]:
        """The KEK of ``version`` (None: the current one), from the cache or from Vault."""
        with self._lock:
            if version is not None and version in self._keks:
                return version, self._keks[version]
        suffix = f"?version={version}" if version is not None else ""
        which = f"version {version} of" if version is not None else "the current version of"
        data = self._call(
            "read",
            f"data/{self.path}{suffix}",
            None,
            f"read {which} KV secret '{self.name}'",
            version=version,
        )
        read_version = int((data.get("metadata") or {}).get("version") or 0)
        value = (data.get("data") or {}).get(self.field)
        if value is None:
            raise KeyMaterialError(
                f"KV secret '{self.mount}/{self.path}' (version {read_version}) has no field "
                f"'{self.field}'",
                hint=f"write a KEK: bao kv put -mount={self.mount} {self.path} "
                f"{self.field}=$(openssl rand -base64 32)",
            )
        try:
            kek = base64.b64decode(str(value), validate=True)
        except binascii.Error:
            kek = b""
        if len(kek) != KEK_SIZE:
            raise KeyMaterialError(
                f"field '{self.field}' of KV secret '{self.mount}/{self.path}' (version "
                f"{read_version}) is not a base64-encoded {KEK_SIZE}-byte key",
                hint=f"write a KEK: bao kv put -mount={self.mount} {self.path} "
                f"{self.field}=$(openssl rand -base64 32)",
            )
        with self._lock:
            self._keks[read_version] = kek
        return read_version, kek

    def identity(self) -> dict[str, Any]:
        return {"provider": PROVIDER, "mount": self.mount, "path": self.path, "field": self.field}

    def check_key(self, record: dict[str, Any]) -> None:
        record = check_provider(record, PROVIDER, OTHER_PROVIDER_HINT)
        name = f"{record.get('mount')}/{record.get('path')}#{record.get('field')}"
        if name != self.name:
            raise WrongKey(
                f"data key was wrapped by the KEK in KV secret '{name}', but the configured one "
                f"is '{self.name}'",
                hint="set keys.vault.kv_mount, kv_path and kv_field to the secret this "
                "repository was written with",
            )

    def _check_record(self, record: dict[str, Any]) -> int:
        self.check_key(record)
        version = record.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise IntegrityError("key record is malformed: 'version' is not a KV version")
        return version

    def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        what: str,
        version: int | None = None,
    ) -> dict[str, Any]:
        full = f"{self.mount}/{path}"
        try:
            if method == "read":
                return self.session.read(full, what)
            return self.session.write(full, body, what)
        except VaultRequestError as exc:
            if exc.status == 404:
                raise self._not_found(what, version, exc) from None
            if exc.mentions("check-and-set"):
                raise VaultError(
                    f"unable to {what}: the secret changed while drkit rotated it",
                    hint="run 'drkit keys rotate' again",
                ) from None
            raise

    def _not_found(self, what: str, version: int | None, exc: VaultRequestError) -> VaultError:
        if exc.mentions("no handler for route"):
            return VaultError(
                f"unable to {what}: no KV secrets engine is mounted at '{self.mount}'",
                hint=f"enable KV v2 (bao secrets enable -path={self.mount} kv-v2) or set "
                "keys.vault.kv_mount",
            )
        metadata = (exc.body.get("data") or {}).get("metadata") or {}
        if version is not None and metadata.get("destroyed"):
            return VaultError(
                f"unable to {what}: version {version} was destroyed, and with it the KEK of "
                "every backup wrapped by it",
                hint="restore from the escrow with --recovery-key; before destroying KEK "
                "versions check 'drkit keys status'",
            )
        if version is not None and metadata.get("deletion_time"):
            return VaultError(
                f"unable to {what}: version {version} is deleted",
                hint=f"undelete it: bao kv undelete -mount={self.mount} -versions={version} "
                f"{self.path}",
            )
        return VaultError(
            f"unable to {what}: the secret does not exist",
            hint=f"write a KEK: bao kv put -mount={self.mount} {self.path} "
            f"{self.field}=$(openssl rand -base64 32), or set keys.vault.kv_path",
        )


def _aad(version: int, key_id: str) -> bytes:
    return _WRAP_AAD_PREFIX + f"{version}:{key_id}".encode("ascii")
