"""Who made a backup: an attacker who can add objects to a repository and holds only public
material (the recovery public key, which is on every host) cannot make a backup, a WAL key
period or a verification record that drkit accepts — not with the configured key (a key file,
or OpenBao's transit), and not with the recovery key either, which until key records were
signed opened whatever was wrapped to its public half."""

from __future__ import annotations

import json
import re
import shutil
import stat
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from rig.archive import enable_archiving, switch_wal, wait_archived
from rig.drkit import Drkit
from rig.postgres import PgCluster, attach_cluster, database_checksums
from rig.vault import VaultSetup, backup_label, restore_and_compare
from typer.testing import CliRunner

from drkit.cli.main import app
from drkit.crypto.keyfile import KeyfileProvider, create_keyfile
from drkit.crypto.signing import Signer
from drkit.errors import BackupSkipped, IntegrityError, UnauthenticRecord
from drkit.repo.events import JobEvent, read_event, write_event
from drkit.repo.label import BackupLabel
from drkit.repo.repository import Repository
from drkit.storage.posix import PosixStorage

DAMAGE = 126  # wal-fetch: damage anywhere exits above 125


def _escrow_kit(workdir: Path) -> tuple[Path, Path]:
    offline = workdir / "offline"
    offline.mkdir()
    made = CliRunner().invoke(app, ["keys", "escrow-init", "--out", str(offline / "recovery")])
    assert made.exit_code == 0, made.output
    return offline / "recovery.pub", offline / "recovery.key"


def _drkit(pg: PgCluster, workdir: Path, name: str) -> Drkit:
    (workdir / name).mkdir()
    return Drkit(pg, workdir / name)


def _signer_fingerprint(dk: Drkit) -> str:
    return str(json.loads((dk.repo_path / "drkit-signer.json").read_text())["signer"])


@pytest.mark.parametrize("provider", ["keyfile", "openbao"])
def test_objects_made_with_public_material_are_refused(
    pg: PgCluster,
    workdir: Path,
    provider: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    public, recovery = _escrow_kit(workdir)
    escrow = {"keys.escrow": {"public_key_file": public}}
    pg.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 5000) g")
    dk = _drkit(pg, workdir, "victim")
    if provider == "openbao":
        setup = VaultSetup(request.getfixturevalue("vault"), dk.workdir)
        monkeypatch.setenv("VAULT_TOKEN", setup.token(setup.policy()))
        setup.configure(dk, escrow=public)
    else:
        dk.write_config(**escrow)
    dk.ok("init")
    genuine = backup_label(dk)
    genuine_data = database_checksums(pg)
    pushed = pg.pgdata / "pg_wal" / switch_wal(pg)
    dk.ok("wal-push", str(pushed))

    # The attacker: the same cluster's data (or any they like), their own key file, the public
    # recovery key; what they make goes into the victim's repository as new objects.
    attacker = _drkit(pg, workdir, "attacker")
    attacker.write_config(**escrow)
    attacker.ok("init")
    pg.psql("CREATE TABLE planted AS SELECT 1 AS x")
    time.sleep(1 - time.time() % 1)  # labels are whole seconds: the forged one must be new
    forged = backup_label(attacker)
    assert forged != genuine
    planted = pg.pgdata / "pg_wal" / switch_wal(pg)
    attacker.ok("wal-push", str(planted))
    shutil.copytree(attacker.repo_path / "backup" / forged, dk.repo_path / "backup" / forged)
    [period] = [p.name for p in (dk.repo_path / "wal-keys").iterdir()]
    [own_period] = [p.name for p in (attacker.repo_path / "wal-keys").iterdir()]
    assert own_period == period  # pushed the same day: the newest record of the victim's period
    shutil.copy(
        attacker.repo_path / "wal-keys" / period / "0001.json",
        dk.repo_path / "wal-keys" / period / "0002.json",
    )
    [wal_object] = [p for p in (attacker.repo_path / "wal").rglob(planted.name)]
    target = dk.repo_path / wal_object.relative_to(attacker.repo_path)
    shutil.copy(wal_object, target)

    # With the recovery key: the forged "latest" is skipped, the genuine backup restored
    result = dk.run("restore", "--pgdata", str(workdir / "escrow"), "--recovery-key", str(recovery))
    assert result.exit_code == BackupSkipped.exit_code, result.output
    assert f"restored backup {genuine}" in result.stdout
    assert f"warning: backup '{forged}' skipped" in result.stderr
    assert "not by the repository's signing key" in result.stderr
    refused = dk.run(
        "restore",
        "--pgdata",
        str(workdir / "f1"),
        "--backup",
        forged,
        "--recovery-key",
        str(recovery),
    )
    assert refused.exit_code == IntegrityError.exit_code, refused.output
    assert not (workdir / "f1").exists()
    # ... and with the configured key
    refused = dk.run("restore", "--pgdata", str(workdir / "f2"), "--backup", forged)
    assert refused.exit_code != 0 and not (workdir / "f2").exists()

    # WAL: the genuine segment is fetched, the planted one refused as damage, with either key
    for key in (["--recovery-key", str(recovery)], []):
        fetched = workdir / f"fetched{len(key)}"
        dk.ok("wal-fetch", *key, pushed.name, str(fetched))
        assert fetched.read_bytes() == pushed.read_bytes()
        result = dk.run("wal-fetch", *key, planted.name, str(workdir / "planted"))
        assert result.exit_code >= DAMAGE, result.output
        assert not (workdir / "planted").exists()

    # An unsigned record (the attacker strips the signature) is refused with the recovery key
    record_path = dk.repo_path / "backup" / forged / "key" / "0001.json"
    record = json.loads(record_path.read_text())
    del record["auth"]
    record_path.unlink()
    record_path.write_text(json.dumps(record))
    refused = dk.run(
        "restore",
        "--pgdata",
        str(workdir / "f3"),
        "--backup",
        forged,
        "--recovery-key",
        str(recovery),
    )
    assert refused.exit_code == IntegrityError.exit_code, refused.output
    assert "is not signed: with the recovery key alone" in refused.stderr

    # An attacker who may also replace objects swaps in their own signing key: an escrow kit
    # that pins the genuine signing key refuses the repository's new one
    pinned = _signer_fingerprint(dk)
    saved = workdir / "saved"
    saved.mkdir()
    for name in ("drkit-signer.json", "signer"):
        path, copy = dk.repo_path / name, attacker.repo_path / name
        shutil.move(path, saved / name)
        (shutil.copytree if copy.is_dir() else shutil.copy)(copy, path)
    text = dk.config.read_text()  # the kit pins the genuine signing key
    assert "[keys.escrow]\n" in text
    dk.config.write_text(
        text.replace("[keys.escrow]\n", f'[keys.escrow]\nsigners = ["{pinned}"]\n')
    )
    refused = dk.run(
        "restore",
        "--pgdata",
        str(workdir / "f4"),
        "--backup",
        forged,
        "--recovery-key",
        str(recovery),
    )
    assert refused.exit_code == IntegrityError.exit_code, refused.output
    assert "which the escrow kit does not pin" in refused.stderr
    assert not (workdir / "f4").exists()

    # With the genuine signing key back (a copy the kit trusts), the genuine backup restores
    for name in ("drkit-signer.json", "signer"):
        path = dk.repo_path / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        shutil.move(saved / name, path)
    restore_and_compare(
        dk, genuine, workdir / "again", genuine_data, "--recovery-key", str(recovery)
    )


def test_a_key_record_moved_elsewhere_does_not_authenticate(tmp_path: Path) -> None:
    create_keyfile(tmp_path / "key")
    keys = KeyfileProvider(tmp_path / "key")
    repo = Repository(PosixStorage(tmp_path / "repo", name="local"), keys)
    repo.initialize(7)
    data_key = keys.new_data_key()
    dek = data_key.plaintext
    signed = repo.auth.sign_key_record(data_key.record, dek, "backup", "20261126-010000F")
    repo.auth.check_key_record(signed, dek, "backup", "20261126-010000F")
    for kind, name in (("backup", "20261127-010000F"), ("wal", "20261126"), ("drill", "x")):
        with pytest.raises(IntegrityError, match="not signed by the repository's signing key"):
            repo.auth.check_key_record(signed, dek, kind, name)
    with pytest.raises(IntegrityError, match="signed for another data key"):
        repo.auth.check_key_record(signed, keys.new_data_key().plaintext, "backup", name)

    # Another repository (another cluster) with the same key file and signing key: its system
    # identifier is in every signature
    other = Repository(PosixStorage(tmp_path / "other", name="other"), keys)
    other.initialize(8)
    shutil.copytree(tmp_path / "repo" / "signer", tmp_path / "other" / "signer")
    shutil.copy(tmp_path / "repo" / "drkit-signer.json", tmp_path / "other" / "drkit-signer.json")
    with pytest.raises(IntegrityError, match="not signed by the repository's signing key"):
        other.auth.check_key_record(signed, dek, "backup", "20261126-010000F")

    # A signing key planted by someone without the key file is refused by writers
    planted = tmp_path / "planted"
    planted_repo = Repository(PosixStorage(planted, name="planted"), keys)
    planted_repo.initialize(7)
    create_keyfile(tmp_path / "theirs")
    theirs = Repository(PosixStorage(planted, name="planted"), KeyfileProvider(tmp_path / "theirs"))
    assert isinstance(theirs.auth.signer(), Signer)
    with pytest.raises(IntegrityError, match="nothing is signed with it") as caught:
        planted_repo.auth.signer()
    assert "was not made with the configured key" in str(caught.value.hint)


def test_forged_verification_records_are_ignored(pg: PgCluster, workdir: Path) -> None:
    pg.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 5000) g")
    dk = Drkit(pg, workdir)
    dk.ok("init")
    full = backup_label(dk, "--type", "full")
    repo = Repository(PosixStorage(dk.repo_path, name="local"), KeyfileProvider(dk.keyfile))
    repo.write_verify_record(BackupLabel(full), ok=False, damaged=3)  # a genuine failure
    # Someone who can add objects claims a newer verification found nothing wrong
    forged = dk.repo_path / "backup" / full / "verify" / "29991231T000000.000000Z.json"
    forged.write_text(
        json.dumps({"ok": True, "damaged_files": 0, "time": datetime.now(UTC).isoformat()})
    )
    assert not repo.verified_ok(BackupLabel(full))

    # The next incremental is not based on the backup whose verification failed
    result = json.loads(dk.ok("backup", "--type", "incr", "--json").stdout)
    assert result["label"].endswith("F"), result
    assert "verification" in result["notice"]

    # Metrics report the genuine failure, not the forged success
    metrics = dk.ok("metrics").stdout
    assert re.search(r'^drkit_verify_last_ok\{repo="local"\} 0(\.0)?$', metrics, re.M), metrics

    # verify reports the forged record (a typed warning) and records a genuine result
    result = dk.run("verify", "--backup", full)
    assert result.exit_code == UnauthenticRecord.exit_code, result.output
    assert (
        f"verification record 'backup/{full}/verify/{forged.name}' is not signed" in result.stderr
    )
    # the genuine result now counts: the next incremental is based on that backup
    result = json.loads(dk.ok("backup", "--type", "incr", "--json").stdout)
    assert result["label"].endswith("I"), result


def test_pitr_with_the_recovery_key_hands_recovery_only_the_wal_keys(
    pg: PgCluster, workdir: Path
) -> None:
    public, recovery = _escrow_kit(workdir)
    dk = Drkit(pg, workdir)
    dk.ok("init")
    escrow = {"keys.escrow": {"public_key_file": public}}
    dk.write_config(**escrow)
    dk.ok("keys", "rewrap")  # escrow the signing key init made before escrow was configured
    enable_archiving(pg, dk, sections=escrow)
    pg.psql("CREATE TABLE ledger AS SELECT g FROM generate_series(1, 1000) g")
    dk.ok("backup")
    pg.psql("INSERT INTO ledger SELECT g FROM generate_series(1001, 2000) g")
    pg.psql("SELECT pg_create_restore_point('here')")
    expected = database_checksums(pg)
    pg.psql("INSERT INTO ledger SELECT g FROM generate_series(2001, 3000) g")
    wait_archived(pg, switch_wal(pg))

    target = workdir / "restored"
    dk.ok(
        "restore", "--pgdata", str(target), "--target-name", "here", "--recovery-key", str(recovery)
    )
    conf = (target / "postgresql.auto.conf").read_text()
    assert "--recovery-key" not in conf and recovery.name not in conf
    assert "--wal-keys drkit-wal-keys.json %f %p'" in conf
    assert "recovery_end_command = 'rm -f drkit-wal-keys.json'" in conf
    keys_file = target / "drkit-wal-keys.json"
    info = keys_file.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == target.stat().st_uid  # the cluster's user, who runs restore_command

    restored = attach_cluster(target, pg.version, workdir, {"archive_mode": "off"})
    restored.start(timeout=120)
    restored.wait_promoted(timeout=60)
    assert database_checksums(restored) == expected
    assert not keys_file.exists()  # removed when recovery ended
    restored.stop()


def test_job_records_are_sealed_and_old_plain_ones_still_read(tmp_path: Path) -> None:
    create_keyfile(tmp_path / "key")
    repo = Repository(
        PosixStorage(tmp_path / "repo", name="local"), KeyfileProvider(tmp_path / "key")
    )
    repo.initialize(7)
    at = datetime(2026, 12, 7, 1, 0, tzinfo=UTC)
    failed = JobEvent("full", False, at, 3.5, 4, "connection to server at db-7.internal failed")
    write_event(repo.storage, repo.auth, failed)
    stored = (tmp_path / "repo" / failed.key).read_bytes()
    assert b"db-7.internal" not in stored and b"sealed" in stored
    assert read_event(repo, failed.key) == failed.as_dict()

    # moved under another run's name, it no longer opens
    moved = JobEvent("full", False, datetime(2026, 12, 8, tzinfo=UTC)).key
    (tmp_path / "repo" / moved).write_bytes(stored)
    with pytest.raises(IntegrityError):
        read_event(repo, moved)

    # with the key provider down the run is still recorded, without its error line
    down = JobEvent("diff", False, at, 2.0, 11, "Vault at vault-3.internal is sealed")
    write_event(repo.storage, None, down)
    assert b"vault-3.internal" not in (tmp_path / "repo" / down.key).read_bytes()
    assert read_event(repo, down.key)["exit_code"] == 11

    # a record an older drkit wrote in clear reads as it is
    old = JobEvent("incr", False, at, 1.0, 4, "old failure")
    (tmp_path / "repo" / "events" / "incr").mkdir()
    (tmp_path / "repo" / old.key).write_text(json.dumps(old.as_dict()))
    assert read_event(repo, old.key)["error"] == "old failure"
