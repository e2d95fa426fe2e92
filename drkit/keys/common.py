"""What the key operations share: the provider they manage, the repositories they walk."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from drkit.config.settings import RepoSettings, Settings
from drkit.crypto.base import KeyProvider
from drkit.crypto.escrow import EscrowRecipient
from drkit.crypto.rotation import VersionedKeyProvider
from drkit.errors import ConfigError
from drkit.repo.key_records import configured_key, split_escrow
from drkit.repo.open import open_key_provider, open_storage, select_repositories
from drkit.repo.repository import Repository


@dataclass(kw_only=True)
class KeyVersions:
    """The configured wrapping key and its versions, as a result of ``keys rotate`` or ``keys
    status`` reports them (first in its JSON). ``latest_version`` None: the key has no versions."""

    provider: str  # the provider kind, e.g. "vault-transit"
    key: str
    latest_version: int | None
    min_decryption_version: int | None = None

    def _data(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "key": self.key,
            "latest_version": self.latest_version,
            "min_decryption_version": self.min_decryption_version,
        }


@dataclass
class ManagedKeys:
    """The configured provider, split into its parts."""

    provider: KeyProvider  # as repositories use it (escrow included)
    base: KeyProvider  # without escrow
    recipient: EscrowRecipient | None
    key: str  # the base provider's key, as records name it

    @property
    def versioned(self) -> VersionedKeyProvider | None:
        return self.base if isinstance(self.base, VersionedKeyProvider) else None

    def require_versioned(self, action: str) -> VersionedKeyProvider:
        if self.versioned is None:
            raise ConfigError(
                f"key provider '{self.base.kind}' has no key versions to {action}",
                hint="rotation needs keys.provider = 'vault-transit' or 'vault-kv'",
            )
        return self.versioned


def open_managed_keys(settings: Settings) -> ManagedKeys:
    if settings.keys.recovery_key is not None:
        raise ConfigError("key management needs the key provider, not a recovery key")
    provider = open_key_provider(settings.keys)
    base, recipient = split_escrow(provider)
    return ManagedKeys(provider, base, recipient, configured_key(base))


def repositories(
    settings: Settings, keys: ManagedKeys, name: str | None
) -> Iterator[tuple[RepoSettings, Repository]]:
    """Every configured repository (one provider for all, so Vault logs in once), or the named
    one. Each is checked to be a drkit repository before it is handed out."""
    for repo_settings in select_repositories(settings, name):
        repo = Repository(open_storage(repo_settings), keys.provider)
        repo.check()
        yield repo_settings, repo
