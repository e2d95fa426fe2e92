"""Key records and key management without PostgreSQL: record sequence numbers, what a record
says about its key, and status/rewrap over WAL key periods (records only, no data)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from rig.servers import VaultServer
from rig.vault import VaultSetup, insecure_http

from drkit.config.settings import Settings
from drkit.crypto.escrow import RecoveryKey, create_recovery_keypair
from drkit.crypto.keyfile import KeyfileProvider, create_keyfile
from drkit.errors import ConfigError, IntegrityError, ObjectExists
from drkit.keys.rewrap import RewrapOperation
from drkit.keys.rotate import RotateOperation
from drkit.keys.status import KeyStatusOperation
from drkit.repo.key_records import describe
from drkit.repo.label import BackupLabel
from drkit.repo.open import open_key_provider
from drkit.repo.repository import Repository
from drkit.storage.posix import PosixStorage

LABEL = BackupLabel("20261126-010000F")


def test_key_records_are_numbered_and_never_replaced(tmp_path: Path) -> None:
    keyfile = tmp_path / "k"
    create_keyfile(keyfile)
    provider = KeyfileProvider(keyfile)
    repo = Repository(PosixStorage(tmp_path / "repo"), provider)
    repo.initialize(7)
    data_key = provider.new_data_key()
    dek = data_key.plaintext
    assert repo.write_key_record(LABEL, data_key.record, dek) == f"backup/{LABEL}/key/0001.json"
    first = (tmp_path / "repo" / "backup" / str(LABEL) / "key" / "0001.json").read_bytes()

    # A second record of the same DEK (as rewrap writes it) comes next, the first stays
    again = provider.new_data_key()  # another nonce: a different record, same shape
    assert repo.write_key_record(LABEL, {**data_key.record, "note": 2}, dek) == (
        f"backup/{LABEL}/key/0002.json"
    )
    assert (tmp_path / "repo" / "backup" / str(LABEL) / "key" / "0001.json").read_bytes() == first
    assert repo.load_dek(LABEL) == data_key.plaintext

    # The newest record wins; a damaged newest one falls back to the older ones
    repo.write_key_record(LABEL, {**again.record, "wrapped": "AAAA"}, again.plaintext)
    assert repo.load_dek(LABEL) == data_key.plaintext
    repo.write_key_record(LABEL, again.record, again.plaintext)
    assert repo.load_dek(LABEL) == again.plaintext

    with pytest.raises(ObjectExists):
        repo.storage.write_bytes(f"backup/{LABEL}/key/0001.json", b"{}")


def test_describe_records() -> None:
    transit = {
        "provider": "vault-transit",
        "mount": "transit",
        "key": "drkit",
        "ciphertext": "vault:v12:YWJj",
    }
    assert (describe(transit).key, describe(transit).version) == ("transit/drkit", 12)
    kv = {"provider": "vault-kv", "mount": "secret", "path": "drkit", "field": "key", "version": 3}
    assert (describe(kv).key, describe(kv).version) == ("secret/drkit#key", 3)
    keyfile = {"provider": "keyfile", "key_id": "abcd"}
    assert (describe(keyfile).key, describe(keyfile).version) == ("abcd", None)
    with pytest.raises(IntegrityError, match="not a Vault transit ciphertext"):
        describe({**transit, "ciphertext": "v12"})


def make_settings(tmp_path: Path, keys: dict[str, Any]) -> Settings:
    return Settings(
        postgres={"pgdata": tmp_path / "pgdata"},
        keys=keys,
        repo=[{"name": "local", "path": tmp_path / "repo"}],
        lock_path=tmp_path / "locks",
    )


def wal_record(repo: Repository, period: str, seq: int = 1) -> dict[str, Any]:
    return dict(json.loads(repo.storage.read_bytes(f"wal-keys/{period}/{seq:04d}.json")))


def test_status_and_rewrap_cover_wal_key_periods(
    vault_server: VaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = VaultSetup(vault_server, tmp_path)
    monkeypatch.setenv("VAULT_TOKEN", vault_server.root_token)
    public, private, recovery_id = create_recovery_keypair(tmp_path / "recovery")
    vault = {
        "addr": vault_server.addr,
        **insecure_http(vault_server),
        "transit_mount": setup.transit_mount,
        "transit_key": setup.transit_key,
    }
    settings = make_settings(tmp_path, {"provider": "vault-transit", "vault": vault})
    provider = open_key_provider(settings.keys)
    repo = Repository(PosixStorage(tmp_path / "repo"), provider)
    repo.initialize(42)

    # Two WAL key periods on v1, as wal-push stores them; one wrapped by a key file
    deks = {}
    for period in ("20261125", "20261126"):
        data_key = provider.new_data_key()
        deks[period] = data_key.plaintext
        repo.storage.write_bytes(
            f"wal-keys/{period}/0001.json", json.dumps(data_key.record).encode()
        )
    keyfile = tmp_path / "old.key"
    create_keyfile(keyfile)
    foreign = KeyfileProvider(keyfile).new_data_key().record
    repo.storage.write_bytes("wal-keys/20261124/0001.json", json.dumps(foreign).encode())

    status = KeyStatusOperation(settings).run()
    assert status.versions_needed == {1: 2} and status.may_raise_to == 1
    assert len(status.other_keys) == 1

    assert RotateOperation(settings).run().latest_version == 2
    report = RewrapOperation(settings).run()
    assert sorted(r.name for r in report.rewrapped) == ["20261125", "20261126"]
    assert all(r.new_record and r.new_record.endswith("/0002.json") for r in report.rewrapped)
    assert len(report.skipped) == 1 and "20261124" in report.skipped[0]
    assert report.exit_code == 116  # a set left as it is: a warning of its own
    for period, dek in deks.items():
        assert wal_record(repo, period, 2)["ciphertext"].startswith("vault:v2:")
        assert provider.unwrap(wal_record(repo, period, 2)) == dek
    status = KeyStatusOperation(settings).run()
    # the two periods, and the signing key the rewrap made to sign their new records
    assert status.versions_needed == {2: 3} and status.may_raise_to == 2

    # Escrow configured later: rewrap adds escrow parts without moving versions
    escrowed = make_settings(
        tmp_path,
        {"provider": "vault-transit", "vault": vault, "escrow": {"public_key_file": public}},
    )
    assert len(KeyStatusOperation(escrowed).run().without_escrow) == 4
    report = RewrapOperation(escrowed).run()
    assert [(r.kind, r.from_version, r.to_version, r.escrow_added) for r in report.rewrapped] == [
        ("signer", 2, 2, True),
        ("wal", 2, 2, True),
        ("wal", 2, 2, True),
    ]
    recovery = RecoveryKey.from_file(private)
    for period, dek in deks.items():
        part = wal_record(repo, period, 3)["escrow"]
        assert part["recipient"] == recovery_id and recovery.unwrap(part) == dek
    assert RewrapOperation(escrowed).run().rewrapped == []


def test_keyfile_provider_cannot_rotate(tmp_path: Path) -> None:
    keyfile = tmp_path / "k"
    create_keyfile(keyfile)
    settings = make_settings(tmp_path, {"provider": "keyfile", "keyfile": keyfile})
    with pytest.raises(ConfigError, match="has no key versions to rotate"):
        RotateOperation(settings).run()
    with pytest.raises(ConfigError, match="has no key versions to rewrap to"):
        RewrapOperation(settings).run()
