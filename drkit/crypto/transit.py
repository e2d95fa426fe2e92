"""Key provider backed by Vault Transit: Vault makes each data key and alone can unwrap it.

A new DEK comes from ``<mount>/datakey/plaintext/<key>``: Vault returns it in clear (used for this
backup, kept only in memory) and wrapped under the transit key (``vault:v<N>:...``); only the
wrapped form is stored. Unwrapping sends the ciphertext to ``<mount>/decrypt/<key>``. The key never
leaves Vault, so whoever holds the repository but not Vault access reads nothing.

The record keeps the ciphertext as Vault wrote it; its ``vault:v<N>:`` prefix is the single source
of the key version, which rotation (``<mount>/keys/<key>/rotate``) and rewrapping
(``<mount>/rewrap/<key>``, which never exposes the DEK) move forward. ``keys status`` reads it to
say which versions backups still need before ``min_decryption_version`` is raised.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from drkit.crypto.base import DEK_SIZE, OTHER_PROVIDER_HINT, DataKey, check_provider
from drkit.crypto.escrow import TAMPERED_HINT
from drkit.crypto.rotation import KeyState
from drkit.crypto.vault import VaultRequestError, VaultSession
from drkit.errors import IntegrityError, KeyMaterialError, VaultError, WrongKey

PROVIDER = "vault-transit"
_CIPHERTEXT = re.compile(r"^vault:v([1-9][0-9]*):[A-Za-z0-9+/=]+$")


def ciphertext_version(ciphertext: object) -> int:
    """The transit key version of a ``vault:v<N>:<base64>`` ciphertext."""
    match = _CIPHERTEXT.match(ciphertext) if isinstance(ciphertext, str) else None
    if match is None:
        raise IntegrityError(
            "key record is malformed: 'ciphertext' is not a Vault transit "
            "ciphertext (vault:v<N>:...)"
        )
    return int(match.group(1))


class VaultTransitProvider:
    """Data keys made and wrapped by one Vault transit key."""

    kind = PROVIDER

    def __init__(self, session: VaultSession, mount: str, key: str) -> None:
        self.session = session
        self.mount = mount.strip("/")
        self.key = key
        self.name = f"{self.mount}/{self.key}"

    def __repr__(self) -> str:
        return f"VaultTransitProvider(addr={self.session.addr!r}, key={self.name!r})"

    # -- KeyProvider ------------------------------------------------------------------------------

    def new_data_key(self) -> DataKey:
        data = self._call(
            f"datakey/plaintext/{self.key}",
            {"bits": DEK_SIZE * 8},
            f"create a data key with transit key '{self.name}'",
        )
        try:
            plaintext = base64.b64decode(data["plaintext"], validate=True)
            ciphertext = str(data["ciphertext"])
        except (KeyError, TypeError, binascii.Error):
            raise VaultError(
                f"Vault returned no usable data key for transit key '{self.name}'"
            ) from None
        if len(plaintext) != DEK_SIZE:
            raise VaultError(
                f"Vault returned a {len(plaintext)}-byte data key for transit key "
                f"'{self.name}'; drkit needs {DEK_SIZE} bytes"
            )
        ciphertext_version(ciphertext)
        record: dict[str, Any] = {
            "provider": PROVIDER,
            "mount": self.mount,
            "key": self.key,
            "ciphertext": ciphertext,
        }
        return DataKey(plaintext=plaintext, record=record)

    def unwrap(self, record: dict[str, Any]) -> bytes:
        ciphertext = self._check_record(record)
        version = ciphertext_version(ciphertext)
        try:
            data = self._call(
                f"decrypt/{self.key}",
                {"ciphertext": ciphertext},
                f"unwrap a data key with transit key '{self.name}'",
            )
        except VaultRequestError as exc:
            if exc.mentions("disallowed by policy", "too old"):
                raise KeyMaterialError(
                    f"data key is wrapped by version {version} of transit key '{self.name}', "
                    "which is below the key's min_decryption_version",
                    hint="lower min_decryption_version to unwrap it; before raising it again run "
                    "'drkit keys rewrap' and check 'drkit keys status'",
                ) from None
            if exc.mentions("version is too new"):
                raise WrongKey(
                    f"data key is wrapped by version {version} of transit key '{self.name}', "
                    "which that key does not have (the key was deleted and re-created?)",
                    hint="restore from the escrow with --recovery-key",
                ) from None
            if exc.status == 400 and exc.mentions("authentication failed", "invalid ciphertext"):
                raise IntegrityError(
                    f"wrapped data key failed authentication in Vault transit key '{self.name}' "
                    "(tampered key record, or the key was re-created)",
                    hint=TAMPERED_HINT,
                ) from None
            raise
        try:
            dek = base64.b64decode(data["plaintext"], validate=True)
        except (KeyError, TypeError, binascii.Error):
            raise IntegrityError("Vault returned no data key for the key record") from None
        if len(dek) != DEK_SIZE:
            raise IntegrityError(
                f"key record unwraps to {len(dek)} bytes, not a {DEK_SIZE}-byte "
                "data key (tampered key record)"
            )
        return dek

    # -- rotation ---------------------------------------------------------------------------------

    def key_state(self) -> KeyState:
        data = self._call(f"keys/{self.key}", None, f"read transit key '{self.name}'", read=True)
        return KeyState(
            provider=PROVIDER,
            key=self.name,
            latest_version=int(data["latest_version"]),
            min_decryption_version=int(data.get("min_decryption_version") or 1),
        )

    def rotate(self) -> KeyState:
        self._call(f"keys/{self.key}/rotate", None, f"rotate transit key '{self.name}'")
        return self.key_state()

    def rewrap(self, record: dict[str, Any]) -> dict[str, Any]:
        """The record re-wrapped by Vault under the key's newest version; the DEK never leaves
        Vault. Fields other than the ciphertext (the escrow part) are copied unchanged."""
        ciphertext = self._check_record(record)
        data = self._call(
            f"rewrap/{self.key}",
            {"ciphertext": ciphertext},
            f"rewrap a data key with transit key '{self.name}'",
        )
        rewrapped = str(data.get("ciphertext", ""))
        ciphertext_version(rewrapped)
        return {**record, "ciphertext": rewrapped}

    # -- internals --------------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        return {"provider": PROVIDER, "mount": self.mount, "key": self.key}

    def check_key(self, record: dict[str, Any]) -> None:
        record = check_provider(record, PROVIDER, OTHER_PROVIDER_HINT)
        name = f"{record.get('mount')}/{record.get('key')}"
        if name != self.name:
            raise WrongKey(
                f"data key was wrapped by transit key '{name}', but the configured transit key "
                f"is '{self.name}'",
                hint="set keys.vault.transit_mount and transit_key to the key this repository "
                "was written with",
            )

    def _check_record(self, record: dict[str, Any]) -> str:
        self.check_key(record)
        ciphertext = record.get("ciphertext")
        ciphertext_version(ciphertext)
        assert isinstance(ciphertext, str)
        return ciphertext

    def _call(
        self, path: str, body: dict[str, Any] | None, what: str, *, read: bool = False
    ) -> dict[str, Any]:
        """A transit request, with "no such key" and "no such mount" explained."""
        try:
            if read:
                return self.session.read(f"{self.mount}/{path}", what)
            return self.session.write(f"{self.mount}/{path}", body, what)
        except VaultRequestError as exc:
            if exc.mentions("encryption key not found", "key not found") or (
                read and exc.status == 404 and not exc.errors
            ):
                raise VaultError(
                    f"unable to {what}: transit key '{self.key}' does not exist on mount "
                    f"'{self.mount}'",
                    hint=f"create it (bao write -f {self.mount}/keys/{self.key}) or set "
                    "keys.vault.transit_key to the existing key",
                ) from None
            if exc.mentions("no handler for route"):
                raise VaultError(
                    f"unable to {what}: no transit secrets engine is mounted at '{self.mount}'",
                    hint=f"enable it (bao secrets enable -path={self.mount} transit) or set "
                    "keys.vault.transit_mount",
                ) from None
            raise
