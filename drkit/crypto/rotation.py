"""What key management (``drkit keys rotate|rewrap|status``) needs from a provider.

A provider whose wrapping key has versions (Vault transit, Vault KV) implements
``VersionedKeyProvider`` on top of ``KeyProvider``: it says what the key's newest version is,
makes a new version, and re-wraps a record under the newest version. Which key and version wrapped
a record is read from the record itself (``drkit.repo.key_records.describe``), without the provider.
The key file provider has one version only and does not implement it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from drkit.crypto.base import KeyProvider


@dataclass(frozen=True)
class KeyState:
    """A wrapping key's versions as its keeper (Vault) reports them."""

    provider: str  # the provider kind, e.g. "vault-transit"
    key: str  # e.g. "transit/drkit" or "secret/drkit#key"
    latest_version: int
    min_decryption_version: int | None = None  # transit only: older versions no longer decrypt


@runtime_checkable
class VersionedKeyProvider(KeyProvider, Protocol):
    name: str  # the key as KeyState.key and key records name it (drkit.repo.key_records.describe)

    def key_state(self) -> KeyState:
        """The key's current versions. Raises VaultError when they cannot be read."""
        ...

    def rotate(self) -> KeyState:
        """Makes a new key version, which new data keys use from now on; returns the new state."""
        ...

    def rewrap(self, record: dict[str, Any]) -> dict[str, Any]:
        """A new record for the same DEK wrapped under the newest key version. Fields the
        provider does not own (the escrow part) are carried over unchanged."""
        ...
