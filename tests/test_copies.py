"""3-2-1 copies: fan-out to S3, restore from S3 alone, per-object fallback, catching up."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

import pytest
from rig.archive import enable_archiving, switch_wal, wait_archived
from rig.drkit import Drkit, start_restored
from rig.postgres import PgCluster, chown_to_server_user, database_checksums


@pytest.fixture
def two_repos(pg: PgCluster, workdir: Path, s3, monkeypatch: pytest.MonkeyPatch) -> Drkit:  # type: ignore[no-untyped-def]
    """A cluster with data, a local repository and an offsite S3 repository (moto over HTTP)."""
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    bucket = f"drkit-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=bucket)
    pg.run_bin("pgbench", "-i", "-s", "2", "-q")
    pg.psql("CREATE TABLE notes AS SELECT g, md5(g::text) FROM generate_series(1, 5000) g")
    s3_repo = {
        "name": "s3-eu",
        "type": "s3",
        "bucket": bucket,
        "prefix": "prod/main",
        "endpoint_url": s3.endpoint_url,
        "region": "us-east-1",
        "offsite": True,
        "max_attempts": 2,
        "connect_timeout": 2,
        "read_timeout": 5,
    }
    dk = Drkit(pg, workdir, extra_repos=[s3_repo])
    dk.ok("init")
    return dk


def test_backup_fans_out_and_restores_from_s3_alone(two_repos: Drkit, workdir: Path) -> None:
    dk, pg = two_repos, two_repos.cluster
    label = json.loads(dk.ok("backup", "--json").stdout)["label"]
    expected = database_checksums(pg)
    info = dk.info()
    copies = info["backups"][0]["copies"]
    assert copies == {
        "repos": ["local", "s3-eu"],
        "copies": 3,
        "media": ["disk", "object-storage"],
        "offsite": 1,
        "rule_3_2_1": "PASS",
    }
    assert info["rule_3_2_1"] == "PASS"
    assert dk.run("verify", "--repo", "s3-eu").exit_code == 0

    shutil.rmtree(dk.repo_path)  # the site is lost: only the S3 copy is left
    target = workdir / "restored"
    result = dk.run("restore", "--pgdata", str(target), "--json")
    assert result.exit_code == 0, result.output
    restored = json.loads(result.stdout)
    assert restored["label"] == label and restored["repo"] == "s3-eu"
    assert "repository 'local' could not be used" in result.stderr
    assert database_checksums(start_restored(target, pg.version, workdir)) == expected


def test_damaged_local_object_is_restored_from_the_s3_copy(two_repos: Drkit, workdir: Path) -> None:
    dk, pg = two_repos, two_repos.cluster
    label = json.loads(dk.ok("backup", "--json").stdout)["label"]
    expected = database_checksums(pg)
    data = sorted(
        (dk.repo_path / "backup" / label / "data").iterdir(), key=lambda p: p.stat().st_size
    )
    victim = data[-1]
    victim.chmod(0o600)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    victim.write_bytes(bytes(raw))

    target = workdir / "restored"
    result = dk.run("restore", "--pgdata", str(target), "--json")
    assert result.exit_code == 0, result.output
    events = json.loads(result.stdout)["fallbacks"]
    key = f"backup/{label}/data/{victim.name}"
    assert any(key in e and "unusable in 'local'" in e for e in events), events
    assert any(key in e and "restored from 's3-eu'" in e for e in events), events
    assert key in result.stderr and "restored from 's3-eu'" in result.stderr
    assert database_checksums(start_restored(target, pg.version, workdir)) == expected


def test_s3_down_backup_succeeds_locally_then_replicate_catches_up(two_repos: Drkit, s3) -> None:  # type: ignore[no-untyped-def]
    dk = two_repos
    s3.stop()
    result = dk.run("backup", "--json")
    assert result.exit_code == 1, result.output  # the warning code: committed, not copied
    label = json.loads(result.stdout)["label"]
    assert f"backup {label} is not yet copied to repository 's3-eu'" in result.stderr
    assert "drkit replicate" in result.stderr
    info = dk.run("info", "--json")
    assert info.exit_code == 1
    data = json.loads(info.stdout)
    assert data["rule_3_2_1"] == "FAIL" and "s3-eu" in data["unreachable"]
    assert data["backups"][0]["copies"]["repos"] == ["local"]

    s3.start()
    replicated = dk.run("replicate", "--json")
    assert replicated.exit_code == 0, replicated.output
    report = json.loads(replicated.stdout)
    assert report["repos"][0]["copied_backups"] == [label]
    assert dk.info()["rule_3_2_1"] == "PASS"
    assert dk.run("verify", "--repo", "s3-eu").exit_code == 0
    # Nothing left to do: a second run copies nothing.
    again = json.loads(dk.ok("replicate", "--json").stdout)
    assert again["repos"][0]["copied_backups"] == [] and again["repos"][0]["copied_wal"] == 0


def test_replicate_skips_what_the_target_would_prune(pg: PgCluster, workdir: Path) -> None:
    """A secondary that keeps only the newest full backup is not sent the older ones."""
    second = workdir / "second"
    offsite = {"name": "vault-room", "path": second, "retention": {"full": 1}}
    dk = Drkit(pg, workdir, extra_repos=[offsite])
    dk.ok("init")
    second.rename(workdir / "unmounted")  # the second repository is offline for a while
    result = dk.run("backup", "--json")
    assert result.exit_code == 1 and "repository 'vault-room' is not initialized" in result.stderr
    old = json.loads(result.stdout)["label"]
    assert not second.exists()  # a missing repository is never created behind the operator
    (workdir / "unmounted").rename(second)
    new = json.loads(dk.ok("backup", "--json").stdout)["label"]

    report = json.loads(dk.ok("replicate", "--json").stdout)
    assert report["repos"][0]["copied_backups"] == []  # the old full would be pruned there
    holders = {b["label"]: b["copies"]["repos"] for b in dk.info()["backups"]}
    assert holders == {old: ["local"], new: ["local", "vault-room"]}


def test_wal_fetch_falls_back_to_the_s3_copy(two_repos: Drkit, workdir: Path) -> None:
    dk, pg = two_repos, two_repos.cluster
    enable_archiving(pg, dk)
    names = [switch_wal(pg) for _ in range(3)][1:]  # two archived segments after a first one
    wait_archived(pg, names[-1])
    dk.ok("replicate")
    assert dk.info()["wal_lag"] == {"s3-eu": 0}

    local = dk.repo_path / "wal" / names[0][:8]
    (local / names[0]).unlink()  # lost locally
    damaged = local / names[1]
    damaged.chmod(0o600)
    raw = bytearray(damaged.read_bytes())
    raw[-100] ^= 1
    damaged.write_bytes(bytes(raw))  # damaged locally

    verify = dk.run("verify", "--wal")
    assert verify.exit_code == 15
    assert f"damaged WAL file '{names[1]}'" in verify.stderr
    assert f"WAL gap on timeline 1: {names[0]}..{names[0]}" in verify.stderr
    assert dk.run("verify", "--wal", "--repo", "s3-eu").exit_code == 0

    for name, why in [(names[0], "missing there"), (names[1], "unusable there")]:
        dest = workdir / f"fetched-{name}"
        result = dk.run("wal-fetch", name, str(dest))
        assert result.exit_code == 0, result.output
        assert f"WAL file {name} fetched from 's3-eu' ({why}" in result.stderr
        assert dest.stat().st_size == 16 * 1024 * 1024
    assert dk.run("wal-fetch", "0000000100000000000000FF", str(workdir / "x")).exit_code == 1


def test_async_archiving_keeps_the_other_repository_within_bounded_lag(
    pg: PgCluster, workdir: Path
) -> None:
    second = {"name": "second", "path": workdir / "second", "media": "tape", "offsite": True}
    dk = Drkit(pg, workdir, extra_repos=[second])
    dk.ok("init")
    enable_archiving(pg, dk, async_=True)
    chown_to_server_user(workdir / "second", recursive=True)
    names = [switch_wal(pg) for _ in range(3)]
    wait_archived(pg, names[-1])
    deadline = time.monotonic() + 60
    while dk.info()["wal_lag"]["second"] != 0:  # the pusher copies before it exits when idle
        assert time.monotonic() < deadline, dk.info()["wal_lag"]
        time.sleep(0.5)
    for name in names:
        assert (workdir / "second" / "wal" / name[:8] / name).is_file()
