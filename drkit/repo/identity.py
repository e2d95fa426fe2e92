"""The repository's key identity: which wrapping key its backups and WAL are sealed with.

``drkit init`` records the key provider's identity (provider kind and key id or key name, no
secret) in a write-once object beside the format object; the format object itself is write-once
and was written before this existed, so the identity lives apart. Everything that seals new data
(``backup``, ``wal-push`` when it starts a key period, ``init``) and ``verify`` compare the
configured provider with it first, so a wrong key file is refused before a single object is
written with it, with the message a restore would give. Key rotation keeps the identity: a
rotated or re-wrapped key has the same name, only a new version.

A repository initialised by a drkit that did not record an identity has none: it is accepted
as it is, and ``drkit init`` records the identity once the configured key has unwrapped the
newest backup's key record.
"""

from __future__ import annotations

import json
from typing import Any

from drkit.crypto.base import KeyProvider
from drkit.errors import ObjectNotFound, RepositoryError, WrongKey
from drkit.storage.base import Storage

IDENTITY_KEY = "drkit-keys.json"


def read_identity(storage: Storage) -> dict[str, Any] | None:
    """The recorded identity; None for a repository initialised before identities existed."""
    try:
        raw = storage.read_bytes(IDENTITY_KEY)
    except ObjectNotFound:
        return None
    try:
        identity = json.loads(raw)
    except json.JSONDecodeError:
        identity = None
    if not isinstance(identity, dict):
        raise RepositoryError(
            f"repository '{storage.name}' has a damaged key identity object '{IDENTITY_KEY}'"
        )
    return identity


def check_identity(storage: Storage, keys: KeyProvider) -> None:
    """Raises WrongKey (naming the key the repository needs) when the configured provider is
    not the one the repository was initialised with. Contacts no key service."""
    identity = read_identity(storage)
    if identity is None:
        return
    try:
        keys.check_key(identity)
    except WrongKey as exc:
        raise WrongKey(
            f"repository '{storage.name}' is sealed with another key: {exc.message}",
            hint=exc.hint,
        ) from None


def record_identity(storage: Storage, keys: KeyProvider) -> bool:
    """Writes the configured provider's identity (write-once); False when one is recorded."""
    if storage.exists(IDENTITY_KEY):
        return False
    payload = json.dumps(keys.identity(), sort_keys=True, indent=2).encode()
    storage.write_bytes(IDENTITY_KEY, payload)
    return True
