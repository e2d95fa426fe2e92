"""The key file provider: file checks, wrapping and unwrapping, what errors say."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from drkit.crypto.base import DataKey, KeyProvider
from drkit.crypto.keyfile import KeyfileProvider, create_keyfile
from drkit.errors import ConfigError, IntegrityError, KeyMaterialError, WrongKey


@pytest.fixture
def keyfile(tmp_path: Path) -> Path:
    path = tmp_path / "drkit.key"
    create_keyfile(path)
    return path


def write_key(path: Path, content: bytes, mode: int) -> Path:
    path.write_bytes(content)
    path.chmod(mode)
    return path


def test_create_keyfile_writes_32_private_bytes(tmp_path: Path) -> None:
    path = tmp_path / "drkit.key"
    key_id = create_keyfile(path)
    assert path.stat().st_mode & 0o777 == 0o600
    kek = path.read_bytes()
    assert len(kek) == 32
    assert key_id == hashlib.sha256(b"drkit-keyfile-id\x00" + kek).hexdigest()[:16]
    assert KeyfileProvider(path).key_id == key_id
    assert [p.name for p in tmp_path.iterdir()] == ["drkit.key"]  # no temporary file left


def test_create_keyfile_never_overwrites(keyfile: Path) -> None:
    before = keyfile.read_bytes()
    with pytest.raises(ConfigError, match="already exists") as caught:
        create_keyfile(keyfile)
    assert caught.value.hint
    assert keyfile.read_bytes() == before
    assert [p.name for p in keyfile.parent.iterdir()] == ["drkit.key"]


def test_create_keyfile_in_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unable to create key file"):
        create_keyfile(tmp_path / "missing" / "drkit.key")


def test_keys_differ(tmp_path: Path) -> None:
    assert create_keyfile(tmp_path / "a") != create_keyfile(tmp_path / "b")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o601])
def test_group_or_other_access_is_refused(tmp_path: Path, mode: int) -> None:
    path = write_key(tmp_path / "drkit.key", os.urandom(32), mode)
    with pytest.raises(ConfigError) as caught:
        KeyfileProvider(path)
    assert f"mode {mode:04o}" in caught.value.message
    assert caught.value.hint == f"chmod 600 {path}"


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_owner_only_modes_are_accepted(tmp_path: Path, mode: int) -> None:
    path = write_key(tmp_path / "drkit.key", os.urandom(32), mode)
    assert KeyfileProvider(path).kind == "keyfile"


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_wrong_size_is_refused(tmp_path: Path, size: int) -> None:
    path = write_key(tmp_path / "drkit.key", os.urandom(size), 0o600)
    with pytest.raises(ConfigError, match=f"holds {size} bytes; a key file holds exactly 32"):
        KeyfileProvider(path)


def test_missing_file_says_how_to_create_one(tmp_path: Path) -> None:
    path = tmp_path / "nope.key"
    with pytest.raises(ConfigError) as caught:
        KeyfileProvider(path)
    assert caught.value.message == f"key file '{path}' does not exist"
    assert caught.value.hint == f"create one with: drkit keys create-keyfile {path}"


def test_a_directory_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "dir.key"
    directory.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="not a regular file"):
        KeyfileProvider(directory)


def test_wrap_and_unwrap(keyfile: Path) -> None:
    provider: KeyProvider = KeyfileProvider(keyfile)
    data_key = provider.new_data_key()
    assert len(data_key.plaintext) == 32
    record = json.loads(json.dumps(data_key.record))  # it is stored as JSON
    assert set(record) == {"provider", "key_id", "nonce", "wrapped"}
    assert record["provider"] == "keyfile"
    assert len(base64.b64decode(record["nonce"])) == 12
    assert len(base64.b64decode(record["wrapped"])) == 32 + 16
    assert KeyfileProvider(keyfile).unwrap(record) == data_key.plaintext  # a later process
    assert provider.new_data_key().plaintext != data_key.plaintext


def test_wrapping_follows_the_documented_format(keyfile: Path) -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    provider = KeyfileProvider(keyfile)
    data_key = provider.new_data_key()
    record = data_key.record
    dek = AESGCM(keyfile.read_bytes()).decrypt(
        base64.b64decode(record["nonce"]),
        base64.b64decode(record["wrapped"]),
        b"drkit-dek-v1\x00" + record["key_id"].encode(),
    )
    assert dek == data_key.plaintext


def test_secrets_stay_out_of_reprs(keyfile: Path) -> None:
    provider = KeyfileProvider(keyfile)
    data_key = provider.new_data_key()
    kek = keyfile.read_bytes()
    for text in (repr(data_key), str(data_key), repr(provider)):
        for secret in (data_key.plaintext, kek):
            assert repr(secret) not in text
            assert secret.hex() not in text
            assert base64.b64encode(secret).decode() not in text
    assert "wrapped" in repr(data_key)


def test_data_key_must_be_32_bytes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        DataKey(plaintext=b"short", record={})


def test_wrong_key_file(tmp_path: Path) -> None:
    create_keyfile(tmp_path / "a.key")
    create_keyfile(tmp_path / "b.key")
    first, second = KeyfileProvider(tmp_path / "a.key"), KeyfileProvider(tmp_path / "b.key")
    record = first.new_data_key().record
    with pytest.raises(WrongKey) as caught:
        second.unwrap(record)
    message = caught.value.message
    assert message.startswith(f"data key was wrapped by keyfile key {first.key_id}, ")
    assert f"is key {second.key_id}" in message
    assert caught.value.hint is not None
    assert first.key_id in caught.value.hint
    assert isinstance(caught.value, KeyMaterialError)


def test_record_of_another_provider(keyfile: Path) -> None:
    record = {"provider": "vault-transit", "key": "drkit", "ciphertext": "vault:v1:..."}
    with pytest.raises(WrongKey, match="'vault-transit'"):
        KeyfileProvider(keyfile).unwrap(record)


def _tampered(record: dict[str, Any], field: str, index: int) -> dict[str, Any]:
    raw = bytearray(base64.b64decode(record[field]))
    raw[index] ^= 0x01
    return {**record, field: base64.b64encode(bytes(raw)).decode()}


@pytest.mark.parametrize(
    ("field", "index"), [("wrapped", 0), ("wrapped", 31), ("wrapped", 47), ("nonce", 0)]
)
def test_tampered_record(keyfile: Path, field: str, index: int) -> None:
    provider = KeyfileProvider(keyfile)
    record = provider.new_data_key().record
    with pytest.raises(IntegrityError) as caught:
        provider.unwrap(_tampered(record, field, index))
    assert caught.value.message == "wrapped data key failed authentication (tampered key record)"


@pytest.mark.parametrize(
    "change",
    [
        {"nonce": None},
        {"wrapped": "not base64!"},
        {"nonce": base64.b64encode(b"short").decode()},
        {"wrapped": 42},
    ],
)
def test_malformed_record(keyfile: Path, change: dict[str, Any]) -> None:
    provider = KeyfileProvider(keyfile)
    record = {**provider.new_data_key().record, **change}
    with pytest.raises(IntegrityError, match="key record is malformed"):
        provider.unwrap(record)
