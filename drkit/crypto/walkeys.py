"""The WAL period keys a restore with the recovery key hands to the restored cluster's recovery.

A point-in-time restore with ``--recovery-key`` needs WAL keys long after ``drkit restore``
ends: PostgreSQL runs ``restore_command`` for every segment until it promotes. Giving that
command the recovery key would leave the master key of every backup readable by the cluster's
user for as long as recovery lasts. Instead, the restore unwraps (and authenticates) the keys of
the WAL periods recovery can need and writes them to ``drkit-wal-keys.json`` in the restored
data directory, 0600 and owned by the cluster's user; ``restore_command`` reads that file
(``wal-fetch --wal-keys``) and ``recovery_end_command`` removes it when recovery ends.

The file maps each key record it covers (the SHA-256 of the record's canonical JSON) to its
DEK, so ``WalKeysProvider`` unwraps exactly those records and no other: a record added to the
repository after the restore (or one the restore refused) is not in the file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from drkit.crypto.base import DEK_SIZE, DataKey
from drkit.errors import ConfigError, IntegrityError, WrongKey

WAL_KEYS_FILE = "drkit-wal-keys.json"
FORMAT = "drkit-wal-keys-v1"
PROVIDER = "wal-keys"


def record_digest(record: dict[str, Any]) -> str:
    """What names a key record in the file: SHA-256 of its canonical JSON."""
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


def wal_keys_document(keys: dict[str, bytes]) -> bytes:
    """The file's content for ``keys`` (record digest -> DEK)."""
    encoded = {digest: base64.b64encode(dek).decode("ascii") for digest, dek in keys.items()}
    return json.dumps({"format": FORMAT, "keys": encoded}, sort_keys=True).encode()


def is_wal_keys_file(path: Path) -> bool:
    """Whether ``path`` looks like a WAL keys file (JSON) rather than a recovery key (PEM)."""
    try:
        with open(path, "rb") as file:
            return file.read(1) == b"{"
    except OSError:
        return False


class WalKeysProvider:
    """Unwraps the WAL key records a restore wrote into its WAL keys file; nothing else."""

    kind = PROVIDER

    def __init__(self, path: Path, keys: dict[str, bytes]) -> None:
        self.path = path
        self._keys = keys

    def __repr__(self) -> str:
        return f"WalKeysProvider(path={str(self.path)!r}, records={len(self._keys)})"

    @classmethod
    def from_file(cls, path: Path) -> WalKeysProvider:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with open(fd, "rb") as file:
            info = os.fstat(file.fileno())
            mode = stat.S_IMODE(info.st_mode)
            if not stat.S_ISREG(info.st_mode) or mode & 0o077:
                raise ConfigError(
                    f"WAL keys file '{path}' can be accessed by group or others (mode {mode:04o})",
                    hint=f"chmod 600 {path}",
                )
            try:
                document = json.loads(file.read())
                assert document["format"] == FORMAT
                keys = {d: base64.b64decode(v, validate=True) for d, v in document["keys"].items()}
            except (ValueError, KeyError, TypeError, AssertionError):
                raise ConfigError(f"'{path}' is not a drkit WAL keys file") from None
        if any(len(dek) != DEK_SIZE for dek in keys.values()):
            raise ConfigError(f"'{path}' is not a drkit WAL keys file")
        return cls(path, keys)

    def new_data_key(self) -> DataKey:
        raise ConfigError(
            "the WAL keys of a restore only read WAL; they cannot seal anything",
            hint="run this command with the configured key provider",
        )

    def identity(self) -> dict[str, Any]:
        return self.new_data_key().record  # raises: nothing is sealed with these keys

    def check_key(self, record: dict[str, Any]) -> None:
        """Any record may be one the file covers: ``unwrap`` tells."""

    def unwrap(self, record: dict[str, Any]) -> bytes:
        if not isinstance(record, dict):
            raise IntegrityError("key record is malformed: not a JSON object")
        dek = self._keys.get(record_digest(record))
        if dek is None:
            raise WrongKey(
                f"key record is not one of those the restore handed to recovery in '{self.path}'",
                hint="a WAL key period the restore did not cover: restore again with"
                " --recovery-key, or fetch with the configured key provider",
            )
        return dek
