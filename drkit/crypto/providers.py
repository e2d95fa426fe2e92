"""Build the key provider the settings describe.

Precedence: a recovery key (``--recovery-key``) replaces the configured provider entirely, so
nothing else (Vault included) is contacted. Otherwise the configured provider (keyfile,
vault-transit, vault-kv) is built, and wrapped in an ``EscrowingProvider`` when a recovery public
key is configured.

``one_shot=True`` is for a process that makes one key request and exits (a synchronous wal-push):
the Vault session then logs in lazily and keeps no token alive, so that with token auth the key
request is the only Vault round trip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from drkit.config.settings import KeysSettings, VaultSettings
from drkit.crypto.base import KeyProvider

if TYPE_CHECKING:
    from drkit.crypto.vault import VaultSession


def open_provider(keys: KeysSettings, *, one_shot: bool = False) -> KeyProvider:
    if keys.recovery_key is not None:
        from drkit.crypto.recovery import RecoveryProvider
        from drkit.crypto.walkeys import WalKeysProvider, is_wal_keys_file

        if is_wal_keys_file(keys.recovery_key):  # what a restore hands to its recovery
            return WalKeysProvider.from_file(keys.recovery_key)

        return RecoveryProvider.from_file(
            keys.recovery_key,
            signers=frozenset(keys.escrow.signers),
            accept_unsigned=keys.escrow.accept_unsigned,
        )
    provider = open_base_provider(keys, one_shot=one_shot)
    if keys.escrow.public_key_file is not None:
        from drkit.crypto.escrow import EscrowingProvider, EscrowRecipient

        recipient = EscrowRecipient.from_file(keys.escrow.public_key_file)
        provider = EscrowingProvider(provider, recipient)
    return provider


def open_base_provider(keys: KeysSettings, *, one_shot: bool = False) -> KeyProvider:
    """The configured provider without escrow."""
    if keys.provider == "keyfile":
        from drkit.crypto.keyfile import KeyfileProvider

        assert keys.keyfile is not None  # enforced by KeysSettings
        return KeyfileProvider(keys.keyfile)
    vault = keys.vault
    assert vault is not None  # enforced by KeysSettings
    if keys.provider == "vault-transit":
        from drkit.crypto.transit import VaultTransitProvider

        session = _session(vault, one_shot)
        return VaultTransitProvider(session, vault.transit_mount, vault.transit_key)
    from drkit.crypto.vaultkv import VaultKvProvider

    assert vault.kv_path is not None  # enforced by KeysSettings
    return VaultKvProvider(_session(vault, one_shot), vault.kv_mount, vault.kv_path, vault.kv_field)


def _session(vault: VaultSettings, one_shot: bool) -> VaultSession:
    from drkit.crypto.vault import VaultSession

    return VaultSession(vault, keep_alive=not one_shot)
