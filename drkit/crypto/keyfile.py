"""Key provider backed by a local key file: 32 raw random bytes that wrap every data key.

The simplest provider, for hosts without Vault, for tests, and as the shape every provider
follows. The key file is the key-encryption key (KEK): whoever can read it can read every backup,
so drkit refuses a key file that group or others can access, and never overwrites one (a lost key
file means lost backups). Its key id, a short hash of the key, is stored in every record it wraps,
so "this is the wrong key file" is told apart from "this record was tampered with".
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from drkit.crypto.base import DEK_SIZE, DataKey, check_provider, decode_field
from drkit.errors import ConfigError, IntegrityError, KeyMaterialError, WrongKey
from drkit.fsutil import os_reason, write_new

KEY_SIZE = 32
NONCE_SIZE = 12
PROVIDER = "keyfile"
_KEY_ID_PREFIX = b"drkit-keyfile-id\x00"
_WRAP_AAD_PREFIX = b"drkit-dek-v1\x00"


def key_id_of(kek: bytes) -> str:
    """The public fingerprint of a key-encryption key (16 hex characters)."""
    return hashlib.sha256(_KEY_ID_PREFIX + kek).hexdigest()[:16]


def create_keyfile(path: Path) -> str:
    """Writes a new random key file with mode 0600 and returns its key id.

    Atomic and write-once: the key is written and synced under a temporary name in the same
    directory, then hard-linked to ``path``, which fails if ``path`` exists. A crash leaves either
    no key file or a complete one.
    """
    kek = os.urandom(KEY_SIZE)
    try:
        with write_new(path, 0o600) as file:
            file.write(kek)
    except FileExistsError:
        raise ConfigError(
            f"key file '{path}' already exists; drkit never overwrites a key file",
            hint="choose another path; replacing a key file makes the backups sealed with it "
            "unreadable",
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"unable to create key file '{path}': {os_reason(exc)}",
            hint="check that the directory exists and is writable",
        ) from None
    return key_id_of(kek)


class KeyfileProvider:
    """Wraps data keys with AES-256-GCM under the key in a local key file."""

    kind = PROVIDER

    def __init__(self, path: Path) -> None:
        self.path = path
        self._kek = _read_keyfile(path)
        self.key_id = key_id_of(self._kek)
        self._aead = AESGCM(self._kek)

    def __repr__(self) -> str:
        return f"KeyfileProvider(path={str(self.path)!r}, key_id={self.key_id!r})"

    def new_data_key(self) -> DataKey:
        dek = os.urandom(DEK_SIZE)
        nonce = os.urandom(NONCE_SIZE)
        wrapped = self._aead.encrypt(nonce, dek, self._aad(self.key_id))
        record: dict[str, Any] = {
            "provider": PROVIDER,
            "key_id": self.key_id,
            "nonce": base64.b64encode(nonce).decode("ascii"),
            "wrapped": base64.b64encode(wrapped).decode("ascii"),
        }
        return DataKey(plaintext=dek, record=record)

    def identity(self) -> dict[str, Any]:
        return {"provider": PROVIDER, "key_id": self.key_id}

    def check_key(self, record: dict[str, Any]) -> None:
        record = check_provider(
            record, PROVIDER, "configure the key provider this repository was written with"
        )
        key_id = record.get("key_id")
        if key_id != self.key_id:
            raise WrongKey(
                f"data key was wrapped by keyfile key {key_id}, but the configured keyfile "
                f"'{self.path}' is key {self.key_id}",
                hint=f"configure the key file whose key id is {key_id}; no other key can "
                "decrypt this data",
            )

    def unwrap(self, record: dict[str, Any]) -> bytes:
        self.check_key(record)
        key_id = record["key_id"]
        nonce = decode_field(record, "nonce")
        wrapped = decode_field(record, "wrapped")
        if len(nonce) != NONCE_SIZE:
            raise IntegrityError(f"key record is malformed: nonce is {len(nonce)} bytes")
        try:
            return self._aead.decrypt(nonce, wrapped, self._aad(key_id))
        except InvalidTag:
            raise IntegrityError(
                "wrapped data key failed authentication (tampered key record)"
            ) from None

    @staticmethod
    def _aad(key_id: str) -> bytes:
        return _WRAP_AAD_PREFIX + key_id.encode("ascii")


def _read_keyfile(path: Path) -> bytes:
    """Reads and checks a key file: a regular file of exactly 32 bytes that only its owner reads."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(
            f"key file '{path}' does not exist",
            hint=f"create one with: drkit keys create-keyfile {path}",
        ) from None
    except OSError as exc:
        raise KeyMaterialError(
            f"unable to read key file '{path}': {os_reason(exc)}",
            hint="run drkit as the user that owns the key file",
        ) from None
    try:
        info = os.fstat(fd)  # of the open file, so the checks cover what is read
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"key file '{path}' is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise ConfigError(
                f"key file '{path}' can be accessed by group or others (mode {mode:04o})",
                hint=f"chmod 600 {path}",
            )
        if info.st_size != KEY_SIZE:
            raise ConfigError(
                f"key file '{path}' holds {info.st_size} bytes; a key file holds exactly "
                f"{KEY_SIZE} raw bytes",
                hint="point the configuration at the right key file, or create one with: "
                "drkit keys create-keyfile PATH (a new key cannot decrypt existing backups)",
            )
        kek = os.read(fd, KEY_SIZE + 1)
    finally:
        os.close(fd)
    if len(kek) != KEY_SIZE:  # the file changed size between fstat and read
        raise ConfigError(f"key file '{path}' changed while it was read")
    return kek
