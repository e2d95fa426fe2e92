"""Drill records in a repository: sealed, bound to their id, written once, never silently lost."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rig.servers import VaultServer
from rig.vault import VaultSetup, insecure_http
from test_keys import make_settings

from drkit.crypto.escrow import EscrowingProvider, EscrowRecipient, create_recovery_keypair
from drkit.crypto.keyfile import KeyfileProvider, create_keyfile
from drkit.crypto.recovery import RecoveryProvider
from drkit.errors import ObjectExists, WrongKey
from drkit.keys.rewrap import RewrapOperation
from drkit.keys.rotate import RotateOperation
from drkit.keys.status import KeyStatusOperation
from drkit.repo.drills import (
    CheckResult,
    DrillOutcome,
    DrillRecord,
    Objective,
    Phase,
    RestorePoint,
    new_drill_id,
)
from drkit.repo.identity import record_identity
from drkit.repo.open import open_key_provider
from drkit.repo.repository import Repository
from drkit.storage.posix import PosixStorage


def make_record(
    when: datetime | None = None,
    backup: str = "20261201-010000F",
    outcome: DrillOutcome = DrillOutcome.PASS,
) -> DrillRecord:
    started = when or datetime.now(UTC)
    return DrillRecord(
        id=new_drill_id(started),
        started_at=started,
        finished_at=started + timedelta(seconds=42),
        started_by="user:alice",
        host="db1",
        drkit_version="0.test",
        repository="local",
        restore_point=RestorePoint(backup=backup, target_kind="latest", reason="newest backup"),
        phases=[Phase(name="restore", seconds=30.5), Phase(name="checks", seconds=4.0)],
        rto=Objective(target_seconds=14400, achieved_seconds=38.2, met=True),
        rpo=Objective(target_seconds=3600, achieved_seconds=12.0, met=True),
        checks=[CheckResult(name="amcheck", kind="amcheck", ok=True, seconds=3.1)],
        outcome=outcome,
    )


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    create_keyfile(tmp_path / "key")
    storage = PosixStorage(tmp_path / "repo", name="local")
    repo = Repository(storage, KeyfileProvider(tmp_path / "key"))
    repo.initialize(7)
    return repo


def test_round_trip(repo: Repository, tmp_path: Path) -> None:
    older = make_record(datetime(2026, 11, 1, 3, 0, tzinfo=UTC))
    newer = make_record(datetime(2026, 12, 1, 3, 0, tzinfo=UTC), outcome=DrillOutcome.FAIL)
    repo.write_drill_record(newer)
    repo.write_drill_record(older)

    entries = repo.drill_records()

    assert [e.id for e in entries] == [older.id, newer.id]
    assert [e.record for e in entries] == [older, newer]
    assert all(e.authentic and e.error is None for e in entries)
    assert repo.last_drill() == entries[-1]
    root = tmp_path / "repo"
    stored = sorted(str(p.relative_to(root)) for p in root.rglob("drills/**/*") if p.is_file())
    assert stored == [
        f"drills/{older.id}/key/0001.json",
        f"drills/{older.id}/record",
        f"drills/{newer.id}/key/0001.json",
        f"drills/{newer.id}/record",
    ]
    # Sealed: nothing of the record is readable in the stored bytes.
    assert b"alice" not in (root / f"drills/{older.id}/record").read_bytes()


def test_write_once(repo: Repository) -> None:
    record = make_record()
    repo.write_drill_record(record)
    with pytest.raises(ObjectExists, match=f"drill record '{record.id}' already exists"):
        repo.write_drill_record(record.model_copy(update={"host": "elsewhere"}))
    [entry] = repo.drill_records()
    assert entry.record == record


def test_a_flipped_byte_fails_authentication(repo: Repository, tmp_path: Path) -> None:
    kept, damaged = make_record(datetime(2026, 11, 1, tzinfo=UTC)), make_record()
    repo.write_drill_record(kept)
    repo.write_drill_record(damaged)
    path = tmp_path / "repo" / f"drills/{damaged.id}/record"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.chmod(0o600)
    path.write_bytes(bytes(blob))

    entries = repo.drill_records()

    assert [e.id for e in entries] == [kept.id, damaged.id]
    assert entries[0].record == kept
    assert entries[1].record is None
    assert f"drill record '{damaged.id}' fails authentication" in str(entries[1].error)
    assert repo.last_drill() == entries[0]  # the newest record that can be trusted


def test_a_record_moved_to_another_id_fails_authentication(
    repo: Repository, tmp_path: Path
) -> None:
    record = make_record(datetime(2026, 12, 1, 3, 0, tzinfo=UTC))
    repo.write_drill_record(record)
    root = tmp_path / "repo"
    forged_id = "20261207-030000Z-beef"
    shutil.copytree(root / f"drills/{record.id}", root / f"drills/{forged_id}")

    entries = {e.id: e for e in repo.drill_records()}

    assert entries[record.id].record == record
    assert entries[forged_id].record is None
    # its key record is signed for the other id, so it is refused before the record is opened
    error = str(entries[forged_id].error)
    assert f"key record 'drills/{forged_id}/key/0001.json' of drill record '{forged_id}'" in error
    assert "is not signed by the repository's signing key" in error


def test_a_missing_key_record_or_a_foreign_name_is_listed_not_dropped(
    repo: Repository, tmp_path: Path
) -> None:
    record = make_record()
    repo.write_drill_record(record)
    root = tmp_path / "repo"
    (root / f"drills/{record.id}/key/0001.json").unlink()
    (root / "drills/not-a-drill").mkdir()
    (root / "drills/not-a-drill/record").write_bytes(b"x")

    entries = {e.id: e for e in repo.drill_records()}

    assert entries[record.id].error == (
        f"drill record '{record.id}' has no key record in repository 'local'"
    )
    assert entries["not-a-drill"].error == "'not-a-drill' is not a drill id"


def test_escrow_part_is_stored_and_the_recovery_key_reads_it(tmp_path: Path) -> None:
    create_keyfile(tmp_path / "key")
    public, private, _ = create_recovery_keypair(tmp_path / "recovery")
    keys = EscrowingProvider(KeyfileProvider(tmp_path / "key"), EscrowRecipient.from_file(public))
    storage = PosixStorage(tmp_path / "repo", name="local")
    record = make_record()
    repo = Repository(storage, keys)
    repo.initialize(7)
    repo.write_drill_record(record)

    key_record = json.loads((tmp_path / "repo" / f"drills/{record.id}/key/0001.json").read_text())
    assert "escrow" in key_record
    (tmp_path / "key").unlink()  # the primary key is gone: only the recovery key remains
    [entry] = Repository(storage, RecoveryProvider.from_file(private)).drill_records()
    assert entry.record == record


def test_rotation_rewraps_drill_records_too(
    vault_server: VaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = VaultSetup(vault_server, tmp_path)
    monkeypatch.setenv("VAULT_TOKEN", vault_server.root_token)
    vault = {
        "addr": vault_server.addr,
        **insecure_http(vault_server),
        "transit_mount": setup.transit_mount,
        "transit_key": setup.transit_key,
    }
    settings = make_settings(tmp_path, {"provider": "vault-transit", "vault": vault})
    repo = Repository(PosixStorage(tmp_path / "repo"), open_key_provider(settings.keys))
    repo.initialize(42)
    record = make_record()
    repo.write_drill_record(record)
    # the drill record's set and the signing key's
    assert KeyStatusOperation(settings).run().versions_needed == {1: 2}

    RotateOperation(settings).run()
    rewrapped, signer = RewrapOperation(settings).run().rewrapped
    assert (rewrapped.kind, rewrapped.name) == ("drill", record.id)
    assert rewrapped.new_record == f"drills/{record.id}/key/0002.json"
    assert signer.kind == "signer"
    assert KeyStatusOperation(settings).run().versions_needed == {2: 2}
    # Once v1 may no longer decrypt, the record still reads (through its v2 key record)
    setup.set_min_decryption_version(2)
    assert repo.drill_record(record.id).record == record


def test_a_repository_sealed_with_another_key_refuses_the_record(tmp_path: Path) -> None:
    create_keyfile(tmp_path / "right")
    create_keyfile(tmp_path / "wrong")
    storage = PosixStorage(tmp_path / "repo", name="local")
    record_identity(storage, KeyfileProvider(tmp_path / "right"))

    with pytest.raises(WrongKey, match="repository 'local' is sealed with another key"):
        Repository(storage, KeyfileProvider(tmp_path / "wrong")).write_drill_record(make_record())

    assert not (tmp_path / "repo" / "drills").exists()
