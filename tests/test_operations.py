"""The operations as a library, as drills and the scheduler call them: no CLI in between."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from rig.archive import enable_archiving, switch_wal, wait_archived
from rig.drkit import Drkit
from rig.postgres import PgCluster, attach_cluster, database_checksums

from drkit.config.settings import load_settings
from drkit.errors import ConfigError, CopyFallback, IntegrityError, Rule321Failed
from drkit.info.operation import describe_repository
from drkit.pg.recovery import RecoveryTarget, TargetKind
from drkit.restore.operation import restore_backup
from drkit.restore.request import RestoreRequest, recovery_target
from drkit.wal.config import load_wal_config
from drkit.wal.operation import WalFetchRequest, fetch_wal


def test_restore_to_a_target_as_a_library(pg: PgCluster, workdir: Path) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    enable_archiving(pg, dk)
    pg.psql("CREATE TABLE ledger AS SELECT g FROM generate_series(1, 1000) g")
    dk.ok("backup")
    pg.psql("INSERT INTO ledger SELECT g FROM generate_series(1001, 2000) g")
    expected = database_checksums(pg)
    pg.psql("SELECT pg_create_restore_point('checked')")
    pg.psql("INSERT INTO ledger SELECT g FROM generate_series(2001, 3000) g")
    wait_archived(pg, switch_wal(pg))
    settings = load_settings(dk.config)

    # Bad targets are refused before anything is written, whoever built them
    never = workdir / "never"
    with pytest.raises(ConfigError, match="invalid recovery target lsn 'nowhere'"):
        restore_backup(
            settings, RestoreRequest(never, target=RecoveryTarget(TargetKind.LSN, "nowhere"))
        )
    with pytest.raises(ConfigError, match="at most one recovery target"):
        recovery_target(time="2026-11-27 10:15:00+00", name="checked")
    with pytest.raises(ConfigError, match="needs a time zone"):
        recovery_target(time="2026-11-27 10:15:00")
    assert not never.exists()

    target = workdir / "pitr"
    request = RestoreRequest(target, target=recovery_target(name="checked"), config=dk.config)
    result = restore_backup(settings, request)
    assert result.exit_code == 0 and result.warnings == []
    assert list(result.phases) == ["plan", "write", "finish", "sync"]
    assert all(seconds >= 0 for seconds in result.phases.values())
    data = json.loads(json.dumps(result.as_dict()))
    assert data["target"] == {
        "kind": "name",
        "value": "checked",
        "action": "promote",
        "timeline": "latest",
        "inclusive": True,
    }
    assert data["exit_code"] == 0 and data["warnings"] == [] and data["repo"] == "local"
    conf = (target / "postgresql.auto.conf").read_text()
    assert f"wal-fetch --prefetch --config {dk.config} %f %p" in conf
    assert "recovery_target_name = 'checked'" in conf

    restored = attach_cluster(target, pg.version, workdir, {"archive_mode": "off"})
    restored.start(timeout=120)
    deadline = time.monotonic() + 60
    while restored.psql("SELECT pg_is_in_recovery()") == "t":
        assert time.monotonic() < deadline, restored.log_tail()
        time.sleep(0.2)
    assert database_checksums(restored) == expected


def test_info_as_a_library_and_its_typed_warning_through_the_cli(
    pg: PgCluster, workdir: Path
) -> None:
    dk = Drkit(pg, workdir)
    dk.write_config(retention={"full": 2}, copies={"require_321": True})
    dk.ok("init")
    label = json.loads(dk.ok("backup", "--json").stdout)["label"]

    info = describe_repository(load_settings(dk.config))
    assert [b.label for b in info.backups] == [label] and info.name == "local"
    # One repository, 3-2-1 required: the live database and one copy, on one medium, none
    # offsite
    assert [type(w) for w in info.warnings] == [Rule321Failed]
    assert info.exit_code == Rule321Failed.exit_code == 102
    assert set(info.phases) == {"copies", "backups", "wal", "drills", "jobs"}
    assert list(info.jobs) == ["full"] and info.jobs["full"].last_fail is None  # the backup's run
    data = info.as_dict()
    assert data["rule_3_2_1"] == "FAIL" and data["exit_code"] == 102
    assert data["warnings"][0]["warning"] == "Rule321Failed" and data["warnings"][0]["code"] == 102

    text = dk.run("info")
    assert text.exit_code == 102, text.output
    assert "warning: the newest backup does not meet 3-2-1" in text.stderr
    assert json.loads(dk.run("info", "--json").stdout)["warnings"] == data["warnings"]


def test_wal_fetch_falls_back_to_the_next_repository_as_a_library(
    pg: PgCluster, workdir: Path
) -> None:
    second = workdir / "second"
    dk = Drkit(pg, workdir, extra_repos=[{"name": "second", "path": second}])
    dk.ok("init")
    enable_archiving(pg, dk)
    names = [switch_wal(pg) for _ in range(2)]
    wait_archived(pg, names[-1])
    dk.ok("replicate")
    config = load_wal_config(dk.config)

    (dk.repo_path / "wal" / names[0][:8] / names[0]).unlink()  # lost in the primary
    dest = workdir / "fetched"
    result = fetch_wal(config, WalFetchRequest(names[0], dest))
    assert result.fetched and result.repo == "second" and result.searched == ["local", "second"]
    assert [type(w) for w in result.warnings] == [CopyFallback]
    assert (
        f"WAL file {names[0]} fetched from 'second' (missing there)" in result.warnings[0].message
    )
    assert result.exit_code == 0  # restore_command's protocol has no warning band
    assert list(result.phases) == ["fetch"]
    assert dest.stat().st_size == 16 * 1024 * 1024

    missing = fetch_wal(config, WalFetchRequest("0000000100000000000000FF", workdir / "x"))
    assert not missing.fetched and missing.exit_code == 1 and not (workdir / "x").exists()
    assert missing.searched == ["local", "second"]

    # Damaged in the primary and absent elsewhere: the damage is raised, never "not archived"
    damaged = dk.repo_path / "wal" / names[1][:8] / names[1]
    damaged.chmod(0o600)
    raw = bytearray(damaged.read_bytes())
    raw[-100] ^= 1
    damaged.write_bytes(bytes(raw))
    (second / "wal" / names[1][:8] / names[1]).unlink()
    with pytest.raises(IntegrityError):
        fetch_wal(config, WalFetchRequest(names[1], workdir / "y"))
    assert not (workdir / "y").exists()
