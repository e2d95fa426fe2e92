"""The key provider interface: where data keys come from and how they are kept.

drkit uses envelope encryption. Each backup (and each WAL key period) gets a fresh 256-bit data key
(DEK) that encrypts its frames. The DEK is never stored in clear: a key provider wraps it under a
key it controls (a key file, Vault Transit, a key read from Vault KV) and the wrapped form, the key
*record*, is stored in the repository's write-once key record. To read the data back, the provider
unwraps the record. A provider never writes plaintext key material to disk or logs.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any, Protocol

from drkit.errors import IntegrityError, WrongKey

DEK_SIZE = 32
OTHER_PROVIDER_HINT = (
    "configure the key provider this repository was written with, or use --recovery-key"
)


@dataclass(frozen=True)
class DataKey:
    """A fresh data key: its plaintext for encrypting now, its wrapped record for storing."""

    plaintext: bytes = field(repr=False)  # 32-byte DEK; must never appear in repr/logs
    record: dict[str, Any]  # JSON-serialisable wrapped form, stored in the write-once key record

    def __post_init__(self) -> None:
        if len(self.plaintext) != DEK_SIZE:
            raise ValueError(f"a data key is {DEK_SIZE} bytes, got {len(self.plaintext)}")


class KeyProvider(Protocol):
    """A source of data keys: wraps new ones, unwraps stored ones.

    ``record["provider"]`` names the provider kind that wrote a record, so a repository can say
    which kind of key it needs.
    """

    kind: str

    def new_data_key(self) -> DataKey:
        """Returns a fresh random DEK and its wrapped record.

        Raises KeyMaterialError when the wrapping key cannot be obtained.
        """
        ...

    def identity(self) -> dict[str, Any]:
        """The non-secret fields that name the wrapping key in every record this provider
        writes (provider kind and key id or key name; never a version, which rotation changes).

        Raises ConfigError for a provider that cannot seal new data (a recovery key).
        """
        ...

    def check_key(self, record: dict[str, Any]) -> None:
        """Raises WrongKey, with the message ``unwrap`` gives, when ``record`` (a key record or
        an ``identity()``) names another provider or key. Contacts no key service."""
        ...

    def unwrap(self, record: dict[str, Any]) -> bytes:
        """Returns the 32-byte DEK a record wraps.

        Raises WrongKey when the record belongs to another key (or provider), IntegrityError when
        it was tampered with or is malformed, KeyMaterialError when the key cannot be obtained.
        """
        ...


def check_provider(record: object, provider: str, hint: str) -> dict[str, Any]:
    """The record as a dict, when it is one written by ``provider``; raises IntegrityError for a
    malformed record, WrongKey for another provider's."""
    if not isinstance(record, dict):
        raise IntegrityError("key record is malformed: not a JSON object")
    if record.get("provider") != provider:
        raise WrongKey(
            f"data key was wrapped by key provider {record.get('provider')!r}, but the configured"
            f" key provider is {provider!r}",
            hint=hint,
        )
    return record


def decode_field(record: dict[str, Any], name: str, what: str = "key record") -> bytes:
    """The base64 field ``name`` of a key record (or escrow part); IntegrityError if malformed."""
    value = record.get(name)
    if not isinstance(value, str):
        raise IntegrityError(f"{what} is malformed: field {name!r} is missing")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise IntegrityError(f"{what} is malformed: field {name!r} is not base64") from None
