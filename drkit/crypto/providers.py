"""Build the key provider the settings describe.

Precedence: a recovery key (``--recovery-key``) replaces the configured provider entirely, so
nothing else (Vault included) is contacted. Otherwise the configured provider (keyfile,
vault-transit, vault-kv) is built, and wrapped in an ``EscrowingProvider`` when a recovery public
key is configured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from drkit.config.settings import KeysSettings, VaultSettings
from drkit.crypto.base import KeyProvider

if TYPE_CHECKING:
    from drkit.crypto.vault import VaultSession


def open_provider(keys: KeysSettings) -> KeyProvider:
    if keys.recovery_key is not None:
        from drkit.crypto.recovery import RecoveryProvider

        return RecoveryProvider.from_file(keys.recovery_key)
    provider = open_base_provider(keys)
    if keys.escrow.public_key_file is not None:
        from drkit.crypto.escrow import EscrowingProvider, EscrowRecipient

        recipient = EscrowRecipient.from_file(keys.escrow.public_key_file)
        provider = EscrowingProvider(provider, recipient)
    return provider


def open_base_provider(keys: KeysSettings) -> KeyProvider:
    """The configured provider without escrow."""
    if keys.provider == "keyfile":
        from drkit.crypto.keyfile import KeyfileProvider

        assert keys.keyfile is not None  # enforced by KeysSettings
        return KeyfileProvider(keys.keyfile)
    vault = keys.vault
    assert vault is not None  # enforced by KeysSettings
    if keys.provider == "vault-transit":
        from drkit.crypto.transit import VaultTransitProvider

        return VaultTransitProvider(_session(vault), vault.transit_mount, vault.transit_key)
    from drkit.crypto.vaultkv import VaultKvProvider

    assert vault.kv_path is not None  # enforced by KeysSettings
    return VaultKvProvider(_session(vault), vault.kv_mount, vault.kv_path, vault.kv_field)


def _session(vault: VaultSettings) -> VaultSession:
    from drkit.crypto.vault import VaultSession

    return VaultSession(vault)
