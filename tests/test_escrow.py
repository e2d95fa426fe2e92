"""Escrow: the recovery key pair, wrapping to it, the recovery provider, and escrow-init."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from drkit.cli.main import app
from drkit.crypto.escrow import (
    EscrowingProvider,
    EscrowRecipient,
    RecoveryKey,
    create_recovery_keypair,
)
from drkit.crypto.keyfile import KeyfileProvider, create_keyfile
from drkit.crypto.recovery import RecoveryProvider
from drkit.errors import ConfigError, IntegrityError, WrongKey


@pytest.fixture
def pair(tmp_path: Path) -> tuple[EscrowRecipient, RecoveryKey]:
    public, private, _ = create_recovery_keypair(tmp_path / "recovery")
    return EscrowRecipient.from_file(public), RecoveryKey.from_file(private)


def test_escrow_init_writes_a_printable_pair(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["keys", "escrow-init", "--out", str(tmp_path / "recovery"), "--json"]
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    public, private = Path(info["public_key_file"]), Path(info["recovery_key_file"])
    assert (public.name, private.name) == ("recovery.pub", "recovery.key")
    assert private.stat().st_mode & 0o777 == 0o600
    assert public.stat().st_mode & 0o777 == 0o644
    for path in (public, private):
        text = path.read_text()
        assert text.isascii() and max(len(line) for line in text.splitlines()) <= 100
        assert info["key_id"] in text
    assert "-----BEGIN PRIVATE KEY-----" in private.read_text()
    assert RecoveryKey.from_file(private).key_id == info["key_id"]
    assert EscrowRecipient.from_file(public).key_id == info["key_id"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recovery.key", "recovery.pub"]

    again = CliRunner().invoke(app, ["keys", "escrow-init", "--out", str(tmp_path / "recovery")])
    assert again.exit_code == ConfigError.exit_code
    assert "already exists; drkit never overwrites a recovery key" in again.stderr
    assert RecoveryKey.from_file(private).key_id == info["key_id"]


def test_wrap_and_unwrap(pair: tuple[EscrowRecipient, RecoveryKey]) -> None:
    recipient, recovery = pair
    dek = os.urandom(32)
    part = recipient.wrap(dek)
    assert part["algorithm"] == "x25519-hkdf-sha256-aes256gcm"
    assert part["recipient"] == recipient.key_id
    assert dek.hex() not in json.dumps(part) and base64.b64encode(dek).decode() not in str(part)
    assert recovery.unwrap(part) == dek
    assert recipient.wrap(dek)["ephemeral"] != part["ephemeral"]  # a fresh key per wrap
    assert "private_key" not in repr(recovery)


def _flip(value: str) -> str:
    raw = bytearray(base64.b64decode(value))
    raw[len(raw) // 2] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize("field", ["ephemeral", "nonce", "wrapped"])
def test_tampered_escrow_part_fails_authentication(
    pair: tuple[EscrowRecipient, RecoveryKey], field: str
) -> None:
    recipient, recovery = pair
    part = recipient.wrap(os.urandom(32))
    part[field] = _flip(part[field])
    with pytest.raises(IntegrityError, match="failed authentication"):
        recovery.unwrap(part)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"algorithm": "rsa"}, "unknown algorithm"),
        ({"nonce": "AAAA"}, "bad field sizes"),
        ({"wrapped": "***"}, "not base64"),
        ({"ephemeral": None}, "'ephemeral' is missing"),
        ({"ephemeral": base64.b64encode(bytes(32)).decode()}, "failed authentication"),
    ],
)
def test_malformed_escrow_part(
    pair: tuple[EscrowRecipient, RecoveryKey], change: dict[str, Any], message: str
) -> None:
    recipient, recovery = pair
    part = {**recipient.wrap(os.urandom(32)), **change}
    with pytest.raises(IntegrityError, match=message):
        recovery.unwrap(part)


def test_another_recovery_key_is_told_apart(
    pair: tuple[EscrowRecipient, RecoveryKey], tmp_path: Path
) -> None:
    recipient, _ = pair
    _, other_private, other_id = create_recovery_keypair(tmp_path / "other")
    part = recipient.wrap(os.urandom(32))
    with pytest.raises(WrongKey, match=f"escrowed to recovery key {recipient.key_id}") as caught:
        RecoveryKey.from_file(other_private).unwrap(part)
    assert other_id in caught.value.message
    # A part relabelled to the other key still fails: the recipient id is authenticated
    with pytest.raises(IntegrityError, match="failed authentication"):
        RecoveryKey.from_file(other_private).unwrap({**part, "recipient": other_id})


def test_escrowing_provider_and_recovery_provider(tmp_path: Path) -> None:
    public, private, _ = create_recovery_keypair(tmp_path / "recovery")
    keyfile = tmp_path / "k"
    create_keyfile(keyfile)
    provider = EscrowingProvider(KeyfileProvider(keyfile), EscrowRecipient.from_file(public))
    data_key = provider.new_data_key()
    assert provider.kind == "keyfile" and "escrow" in data_key.record
    assert provider.unwrap(data_key.record) == data_key.plaintext
    recovery = RecoveryProvider.from_file(private)
    assert recovery.unwrap(data_key.record) == data_key.plaintext

    without = {k: v for k, v in data_key.record.items() if k != "escrow"}
    with pytest.raises(WrongKey, match="has no escrow part"):
        recovery.unwrap(without)
    with pytest.raises(ConfigError, match="only reads backups"):
        recovery.new_data_key()
    # The provider part and the escrow part are independent: tampering one leaves the other
    tampered = dict(data_key.record, wrapped=_flip(data_key.record["wrapped"]))
    assert recovery.unwrap(tampered) == data_key.plaintext
    with pytest.raises(IntegrityError):
        provider.unwrap(tampered)


def test_recovery_key_file_checks(tmp_path: Path) -> None:
    public, private, key_id = create_recovery_keypair(tmp_path / "recovery")
    private.chmod(0o640)
    with pytest.raises(ConfigError, match="can be accessed by group or others") as caught:
        RecoveryKey.from_file(private)
    assert caught.value.hint == f"chmod 600 {private}"
    private.chmod(0o600)

    typed = tmp_path / "typed.key"  # typed back from paper: comments and odd line breaks
    body = private.read_text().split("-----BEGIN PRIVATE KEY-----")[1].split("-----END")[0]
    squeezed = "".join(body.split())
    typed.write_text(
        f"typed from the safe copy\n\n-----BEGIN PRIVATE KEY-----\n"
        f"{squeezed[:20]}\n{squeezed[20:]}\n-----END PRIVATE KEY-----\n"
    )
    typed.chmod(0o600)
    assert RecoveryKey.from_file(typed).key_id == key_id

    with pytest.raises(ConfigError, match="holds no recovery key"):
        RecoveryKey.from_file(_private_copy(public, tmp_path / "pub-as-key"))
    with pytest.raises(ConfigError, match="holds no recovery public key"):
        EscrowRecipient.from_file(private)
    with pytest.raises(ConfigError, match="does not exist"):
        RecoveryKey.from_file(tmp_path / "missing.key")


def _private_copy(source: Path, target: Path) -> Path:
    target.write_bytes(source.read_bytes())
    target.chmod(0o600)
    return target
