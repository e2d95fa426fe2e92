"""Break-glass escrow: every data key is also wrapped to an offline recovery public key.

Losing Vault must not mean losing every backup. With ``[keys.escrow] public_key_file`` set, each
new DEK is additionally wrapped to an X25519 recovery public key and the result is stored in the
key record as ``record["escrow"]``. The matching private key (``recovery.key``, written by
``drkit keys escrow-init``) is kept offline, e.g. printed and locked in a safe; with it,
``--recovery-key`` reads every backup without contacting Vault at all.

The wrapping is ECIES in the shape of age's X25519 recipient stanza: a fresh ephemeral X25519 key
per DEK, ``HKDF-SHA256(shared secret, salt = ephemeral public || recipient public,
info = "drkit-escrow-v1")`` gives a one-time AES-256-GCM key, and the recipient's key id is the
associated data, so a part moved to another recipient or altered fails authentication.

What escrow does not give: the recovery public key is public, so anyone who can write to the
repository could wrap a key of their own to it. The escrow part proves nothing about who wrote a
backup; the repository's write-once storage does. Both key files are PEM, so they can be printed
and typed back in.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from drkit.crypto.base import DEK_SIZE, DataKey, KeyProvider, decode_field
from drkit.errors import ConfigError, IntegrityError, KeyMaterialError, WrongKey
from drkit.fsutil import os_reason, write_new

_PART = "escrow part of the key record"
ALGORITHM = "x25519-hkdf-sha256-aes256gcm"
NONCE_SIZE = 12
_KEY_ID_PREFIX = b"drkit-escrow-id\x00"
_HKDF_INFO = b"drkit-escrow-v1"
_AAD_PREFIX = b"drkit-escrow-v1\x00"
TAMPERED_HINT = (
    "compare the key record with the same backup's record in another repository copy; if the "
    "backup was escrowed, --recovery-key reads it from its escrow part"
)
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----\s+([A-Za-z0-9+/=\s]+?)-----END \1-----")


def recipient_id(public_key: X25519PublicKey) -> str:
    """The public fingerprint of a recovery key pair (16 hex characters)."""
    raw = public_key.public_bytes_raw()
    return hashlib.sha256(_KEY_ID_PREFIX + raw).hexdigest()[:16]


@dataclass(frozen=True)
class EscrowRecipient:
    """The recovery public key: wraps data keys so that only the recovery key unwraps them."""

    public_key: X25519PublicKey
    key_id: str

    @classmethod
    def from_file(cls, path: Path) -> EscrowRecipient:
        der = _read_pem(path, "PUBLIC KEY", "recovery public key")
        try:
            key = serialization.load_der_public_key(der)
        except ValueError:
            key = None
        if not isinstance(key, X25519PublicKey):
            raise ConfigError(
                f"'{path}' is not an X25519 recovery public key",
                hint="point keys.escrow.public_key_file at the .pub file of drkit keys escrow-init",
            )
        return cls(key, recipient_id(key))

    def wrap(self, dek: bytes) -> dict[str, Any]:
        """The escrow part of a key record for ``dek``."""
        ephemeral = X25519PrivateKey.generate()
        ephemeral_public = ephemeral.public_key().public_bytes_raw()
        shared = ephemeral.exchange(self.public_key)
        key = _derive(shared, ephemeral_public, self.public_key.public_bytes_raw())
        nonce = os.urandom(NONCE_SIZE)
        wrapped = AESGCM(key).encrypt(nonce, dek, _AAD_PREFIX + self.key_id.encode("ascii"))
        return {
            "algorithm": ALGORITHM,
            "recipient": self.key_id,
            "ephemeral": _b64(ephemeral_public),
            "nonce": _b64(nonce),
            "wrapped": _b64(wrapped),
        }


@dataclass(frozen=True)
class RecoveryKey:
    """The offline recovery private key: unwraps the escrow part of key records."""

    private_key: X25519PrivateKey = field(repr=False)
    key_id: str

    @classmethod
    def from_file(cls, path: Path) -> RecoveryKey:
        _check_private_mode(path)
        der = _read_pem(path, "PRIVATE KEY", "recovery key")
        try:
            key = serialization.load_der_private_key(der, password=None)
        except (ValueError, TypeError):
            key = None
        if not isinstance(key, X25519PrivateKey):
            raise ConfigError(
                f"'{path}' is not an X25519 recovery key",
                hint="pass the .key file written by drkit keys escrow-init",
            )
        return cls(key, recipient_id(key.public_key()))

    def unwrap(self, part: object) -> bytes:
        """The DEK in an escrow part. Raises WrongKey for another recipient's part,
        IntegrityError for a tampered or malformed one."""
        if not isinstance(part, dict):
            raise IntegrityError("escrow part of the key record is malformed: not a JSON object")
        if part.get("algorithm") != ALGORITHM:
            raise IntegrityError(
                f"escrow part of the key record has unknown algorithm {part.get('algorithm')!r}"
            )
        recipient = part.get("recipient")
        if recipient != self.key_id:
            raise WrongKey(
                f"data key is escrowed to recovery key {recipient}, but the given recovery key "
                f"is {self.key_id}",
                hint=f"use the recovery key whose id is {recipient} (drkit keys escrow-init "
                "printed it; it is also in the key file's header)",
            )
        ephemeral_public = decode_field(part, "ephemeral", _PART)
        nonce = decode_field(part, "nonce", _PART)
        if len(ephemeral_public) != 32 or len(nonce) != NONCE_SIZE:
            raise IntegrityError("escrow part of the key record is malformed: bad field sizes")
        try:
            shared = self.private_key.exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
        except ValueError:  # a low-order point: never written by drkit
            raise IntegrityError("escrow part of the key record failed authentication") from None
        own_public = self.private_key.public_key().public_bytes_raw()
        key = _derive(shared, ephemeral_public, own_public)
        aad = _AAD_PREFIX + self.key_id.encode("ascii")
        try:
            dek = AESGCM(key).decrypt(nonce, decode_field(part, "wrapped", _PART), aad)
        except InvalidTag:
            raise IntegrityError(
                "escrow part of the key record failed authentication (tampered key record)"
            ) from None
        if len(dek) != DEK_SIZE:
            raise IntegrityError(f"escrow part unwraps to {len(dek)} bytes, not a data key")
        return dek


class EscrowingProvider:
    """A provider that also wraps every new DEK to the recovery public key.

    Unwrapping goes to the wrapped provider; the escrow part is only read with --recovery-key.
    """

    def __init__(self, inner: KeyProvider, recipient: EscrowRecipient) -> None:
        self.inner = inner
        self.recipient = recipient
        self.kind = inner.kind

    def __repr__(self) -> str:
        return f"EscrowingProvider({self.inner!r}, recipient={self.recipient.key_id!r})"

    def new_data_key(self) -> DataKey:
        data_key = self.inner.new_data_key()
        record = {**data_key.record, "escrow": self.recipient.wrap(data_key.plaintext)}
        return DataKey(plaintext=data_key.plaintext, record=record)

    def identity(self) -> dict[str, Any]:
        return self.inner.identity()

    def check_key(self, record: dict[str, Any]) -> None:
        self.inner.check_key(record)

    def unwrap(self, record: dict[str, Any]) -> bytes:
        return self.inner.unwrap(record)


def create_recovery_keypair(out: Path) -> tuple[Path, Path, str]:
    """Writes ``<out>.pub`` (0644) and ``<out>.key`` (0600, the secret half); returns both paths
    and the key id. Refuses to overwrite either file."""
    public_path, private_path = out.with_name(out.name + ".pub"), out.with_name(out.name + ".key")
    for path in (public_path, private_path):
        if path.exists() or path.is_symlink():
            raise ConfigError(
                f"'{path}' already exists; drkit never overwrites a recovery key",
                hint="choose another --out; a new recovery key cannot read backups escrowed to "
                "the old one",
            )
    private = X25519PrivateKey.generate()
    key_id = recipient_id(private.public_key())
    header = (
        f"# drkit recovery key {key_id}: unwraps the escrowed data key of every backup.\n"
        "# Keep it offline (printed, in a safe); anyone holding it can read the backups.\n"
    ).encode()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_once(private_path, header + private_pem, 0o600)
    public_header = f"# drkit recovery public key {key_id}: [keys.escrow] public_key_file\n"
    _write_once(public_path, public_header.encode() + public_pem, 0o644)
    return public_path, private_path, key_id


def _derive(shared: bytes, ephemeral_public: bytes, recipient_public: bytes) -> bytes:
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=ephemeral_public + recipient_public,
        info=_HKDF_INFO,
    )
    return hkdf.derive(shared)


def _read_pem(path: Path, label: str, what: str) -> bytes:
    """The DER inside the first ``label`` PEM block of ``path``; text around it is ignored, so a
    key typed back from paper with comments or stray blank lines still reads."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} '{path}' does not exist") from None
    except OSError as exc:
        raise KeyMaterialError(f"unable to read {what} '{path}': {exc.strerror or exc}") from None
    for match in _PEM_BLOCK.finditer(text):
        if match.group(1).decode() == label:
            try:
                return base64.b64decode(b"".join(match.group(2).split()), validate=True)
            except binascii.Error:
                break
    raise ConfigError(f"'{path}' holds no {what} (no valid PEM '{label}' block)")


def _check_private_mode(path: Path) -> None:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        raise ConfigError(f"recovery key '{path}' does not exist") from None
    except OSError as exc:
        raise KeyMaterialError(f"unable to read recovery key '{path}': {exc.strerror}") from None
    if mode & 0o077:
        raise ConfigError(
            f"recovery key '{path}' can be accessed by group or others (mode {mode:04o})",
            hint=f"chmod 600 {path}",
        )


def _write_once(path: Path, content: bytes, mode: int) -> None:
    """Atomic and write-once (drkit.fsutil.write_new)."""
    try:
        with write_new(path, mode) as file:
            file.write(content)
    except FileExistsError:
        raise ConfigError(
            f"'{path}' already exists; drkit never overwrites a recovery key"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"unable to write '{path}': {os_reason(exc)}",
            hint="check that the directory exists and is writable",
        ) from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
