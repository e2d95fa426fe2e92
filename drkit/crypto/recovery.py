"""Reading backups with the recovery key alone (``--recovery-key``): the break-glass path.

``RecoveryProvider`` unwraps the escrow part of key records with the offline recovery private key
and nothing else. It never contacts Vault or reads the configured key file, so a restore or a
verify works with Vault sealed, unreachable or gone. It cannot make new data keys: a recovery key
reads backups, it does not take them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from drkit.crypto.base import DataKey
from drkit.errors import ConfigError, IntegrityError, WrongKey

if TYPE_CHECKING:  # loaded with the key: X25519 and key serialization are for escrow alone
    from drkit.crypto.escrow import RecoveryKey

PROVIDER = "recovery"


class RecoveryProvider:
    """Unwraps data keys from the escrow part of key records with the recovery key."""

    kind = PROVIDER

    def __init__(
        self,
        key: RecoveryKey,
        *,
        signers: frozenset[str] = frozenset(),
        accept_unsigned: bool = False,
    ) -> None:
        self.key = key
        # the escrow kit's trust in who made a record (drkit.repo.signer): the signing keys it
        # pins (empty: the repository's own), and whether unsigned records are read at all
        self.signers = signers
        self.accept_unsigned = accept_unsigned

    @classmethod
    def from_file(
        cls, path: Path, *, signers: frozenset[str] = frozenset(), accept_unsigned: bool = False
    ) -> RecoveryProvider:
        from drkit.crypto.escrow import RecoveryKey

        return cls(RecoveryKey.from_file(path), signers=signers, accept_unsigned=accept_unsigned)

    def __repr__(self) -> str:
        return f"RecoveryProvider(key_id={self.key.key_id!r})"

    def new_data_key(self) -> DataKey:
        raise ConfigError(
            "a recovery key only reads backups; it cannot seal new ones",
            hint="run this command without --recovery-key",
        )

    def identity(self) -> dict[str, Any]:
        return self.new_data_key().record  # raises: a recovery key seals nothing

    def check_key(self, record: dict[str, Any]) -> None:
        """Any record with an escrow part is readable: the provider's key is not needed."""

    def unwrap(self, record: dict[str, Any]) -> bytes:
        if not isinstance(record, dict):
            raise IntegrityError("key record is malformed: not a JSON object")
        part = record.get("escrow")
        if part is None:
            raise WrongKey(
                "key record has no escrow part: the backup was taken before escrow was configured",
                hint="read it with the key provider, or add an escrow part with "
                "'drkit keys rewrap' while the provider is available",
            )
        return self.key.unwrap(part)
