"""kill -9 at random points of wal-push (sync, and the async pusher), replicate, prune, keys
rewrap and drill. After every kill: verify passes, nothing partial is listed, no WAL segment
acknowledged to PostgreSQL is missing; and the next run succeeds. (Backup has its own: see
tests/test_backup_restore.py and tests/test_copies.py.)

Operations that are fast on a local disk run against S3 behind the fault proxy, which delays
each write or delete a little, so that a random kill lands in the middle of them. Each test runs
``DRKIT_FAULT_TRIALS`` rounds (1 here; scripts/faults_campaign.sh runs more).
"""

from __future__ import annotations

import json
import os
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from rig.archive import archiver_status, enable_archiving, switch_wal, wait_archived
from rig.drkit import Drkit, start_restored, toml_value
from rig.faultproxy import S3FaultProxy
from rig.kill import TRIALS, RandomKiller, kill_at_random, report
from rig.postgres import PgCluster, database_checksums
from rig.servers import S3Server
from typer.testing import CliRunner

from drkit.cli.main import app
from drkit.config.settings import load_settings
from drkit.repo.open import open_repository
from drkit.repo.wal_archive import WalArchive

NEWEST = int(os.environ.get("DRKIT_TEST_PG_VERSIONS", "15,18").replace(" ", "").split(",")[-1])


@pytest.fixture
def cluster(pg_factory: Any) -> PgCluster:
    """One cluster of the newest tested version: the kills are about drkit, not the version."""
    cluster: PgCluster = pg_factory(NEWEST)
    return cluster


@pytest.fixture
def proxy(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3FaultProxy]:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    with S3FaultProxy(s3_server.direct_endpoint_url) as proxy:
        yield proxy


def s3_repo(server: S3Server, proxy: S3FaultProxy, name: str) -> dict[str, Any]:
    bucket = f"drkit-kill-{uuid.uuid4().hex[:12]}"
    server.client().create_bucket(Bucket=bucket)
    return {
        "name": name,
        "type": "s3",
        "bucket": bucket,
        "prefix": "prod/main",
        "region": server.region,
        "endpoint_url": proxy.endpoint_url,
        "offsite": True,
        "max_attempts": 3,
    }


def only_repos(dk: Drkit, *repos: dict[str, Any], keep_local: bool, **sections: Any) -> None:
    """Rewrite ``dk``'s configuration with these repositories (after the local one, or alone)."""
    dk.extra_repos = list(repos)
    dk.write_config(**sections)
    if not keep_local:
        text = dk.config.read_text()
        start = text.index("[[repo]]")
        rest = text[start:].split("[[repo]]")[2:]  # drop the local one
        dk.config.write_text(text[:start] + "".join(f"[[repo]]{r}" for r in rest))


def listed(dk: Drkit, repo: str) -> list[str]:
    data = json.loads(dk.run("info", "--repo", repo, "--json").stdout)
    return [b["label"] for b in data["backups"]]


def verified(dk: Drkit, repo: str) -> None:
    """Every backup the repository lists reads back whole."""
    result = dk.run("verify", "--repo", repo, "--json")
    assert result.exit_code == 0, result.output


# -- wal-push -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_wal_push_killed_at_random_loses_no_acknowledged_segment(
    cluster: PgCluster, workdir: Path, mode: str
) -> None:
    """PostgreSQL archives while archive_commands (and the async pusher) are killed at random.
    Every segment PostgreSQL was told is archived is in the repository, intact, with no gap."""
    dk = Drkit(cluster, workdir)
    dk.ok("init")
    enable_archiving(cluster, dk, async_=mode == "async")
    cluster.psql("CREATE TABLE t (i int, v text)")
    first = switch_wal(cluster)
    commands = ("wal-push", "wal-pusher")
    for trial in range(TRIALS):
        rng = random.Random(trial)
        with RandomKiller(dk.config, commands, rng, every=0.4, limit=4) as killer:
            # Ten segments at least, more (30 at most) until a kill has landed
            for written in range(1, 31):
                cluster.psql(
                    "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 20000) g"
                )
                last = switch_wal(cluster)
                if written >= 10 and killer.kills:
                    break
        wait_archived(cluster, last, timeout=120)
        acknowledged, _, _ = archiver_status(cluster)
        archive = WalArchive(open_repository(load_settings(dk.config)))
        stored = set(archive.segments(1))
        missing = [name for name in _segment_range(first, acknowledged) if name not in stored]
        assert missing == [], f"acknowledged but not archived: {missing} (kills {killer.kills})"
        for name in stored:
            archive.check(name)  # every object authenticates: nothing partial
        assert archive.find_gaps(1, first, acknowledged) == []
        assert killer.kills, "no archive_command was killed"
        report(
            f"wal-push {mode}",
            f"{len(killer.kills)} kills ({', '.join(killer.kills)}),"
            f" {len(stored)} segments archived, none acknowledged missing",
        )
    assert dk.run("verify", "--wal").exit_code == 0


def _segment_range(first: str, last: str) -> list[str]:
    timeline, start, end = first[:8], int(first[8:], 16), int(last[8:], 16)
    per_log = 0x100  # 16 MiB segments
    names = []
    for n in range(_seg(start, per_log), _seg(end, per_log) + 1):
        names.append(f"{timeline}{n // per_log:08X}{n % per_log:08X}")
    return names


def _seg(value: int, per_log: int) -> int:
    return (value >> 32) * per_log + (value & 0xFFFFFFFF)


# -- replicate -----------------------------------------------------------------------------------


def test_replicate_killed_at_random_lists_only_whole_copies(
    cluster: PgCluster, workdir: Path, s3_server: S3Server, proxy: S3FaultProxy
) -> None:
    dk = Drkit(cluster, workdir)
    cluster.psql("CREATE TABLE t AS SELECT g, md5(g::text) AS v FROM generate_series(1, 50000) g")
    dk.ok("init")
    labels = []
    for kind in ("full", "incr", "incr"):
        cluster.psql("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 5000) g")
        labels.append(json.loads(dk.ok("backup", "--type", kind, "--json").stdout)["label"])
    only_repos(dk, s3_repo(s3_server, proxy, "offsite"), keep_local=True)
    dk.ok("init")  # creates the offsite repository; the backups are only in the local one
    assert listed(dk, "offsite") == []
    killed = 0
    for trial in range(3 * TRIALS):
        proxy.plan("slow", method="PUT", times=None, delay=0.03)
        killed += kill_at_random(lambda: dk.spawn("replicate"), random.Random(trial), 2.0)
        proxy.clear()
        copies = listed(dk, "offsite")
        assert copies == labels[: len(copies)]  # whole backups only, in order
        verified(dk, "offsite")
    assert killed >= 1
    report("replicate", f"{3 * TRIALS} runs, {killed} killed mid-run; listed copies whole")
    result = dk.run("replicate", "--json")
    assert result.exit_code == 0, result.output
    assert listed(dk, "offsite") == labels
    verified(dk, "offsite")


# -- prune ---------------------------------------------------------------------------------------


def test_prune_killed_at_random_leaves_every_listed_backup_whole(
    cluster: PgCluster, workdir: Path, s3_server: S3Server, proxy: S3FaultProxy
) -> None:
    dk = Drkit(cluster, workdir)
    only_repos(dk, s3_repo(s3_server, proxy, "offsite"), keep_local=False, retention={"full": 1})
    cluster.psql("CREATE TABLE t (i int)")
    dk.ok("init")
    labels = []
    for step, kind in enumerate(["full", "incr", "full", "incr", "full", "incr"]):
        cluster.psql(f"INSERT INTO t SELECT generate_series({step * 10}, {step * 10 + 9})")
        labels.append(json.loads(dk.ok("backup", "--type", kind, "--json").stdout)["label"])
    state = database_checksums(cluster)
    killed = 0
    for trial in range(3 * TRIALS):
        proxy.plan("slow", method="DELETE", times=None, delay=0.03)
        killed += kill_at_random(lambda: dk.spawn("prune"), random.Random(trial), 1.5)
        proxy.clear()
        remaining = listed(dk, "offsite")
        assert labels[-2:] == remaining[-2:]  # what the policy keeps is never touched
        verified(dk, "offsite")  # every backup still listed is whole, its parents too
    assert killed >= 1
    report("prune", f"{3 * TRIALS} runs, {killed} killed mid-run; listed backups whole")
    result = dk.run("prune", "--json")
    assert result.exit_code == 0, result.output
    assert listed(dk, "offsite") == labels[-2:]
    assert json.loads(dk.run("info", "--json").stdout)["incomplete"] == []
    target = workdir / "restored"
    dk.ok("restore", "--pgdata", str(target))
    restored = start_restored(target, cluster.version, workdir)
    assert database_checksums(restored) == state


# -- keys rewrap ---------------------------------------------------------------------------------


def test_rewrap_killed_at_random_keeps_every_backup_readable(
    cluster: PgCluster, workdir: Path, s3_server: S3Server, proxy: S3FaultProxy
) -> None:
    """Adding the escrow part to every key record: a rewrap killed anywhere leaves each backup
    readable by the configured key; the next one finishes, and the recovery key alone reads
    everything."""
    dk = Drkit(cluster, workdir)
    repo = s3_repo(s3_server, proxy, "offsite")
    only_repos(dk, repo, keep_local=False)
    cluster.psql("CREATE TABLE t AS SELECT generate_series(1, 1000) g")
    dk.ok("init")
    labels = [json.loads(dk.ok("backup", "--json").stdout)["label"] for _ in range(4)]
    made = CliRunner().invoke(
        app, ["keys", "escrow-init", "--out", str(workdir / "recovery"), "--json"]
    )
    assert made.exit_code == 0, made.output
    pair = json.loads(made.stdout)
    text = dk.config.read_text()
    escrow = f"[keys.escrow]\npublic_key_file = {toml_value(pair['public_key_file'])}\n"
    dk.config.write_text(text.replace("[backup]", escrow + "[backup]"))
    killed = 0
    for trial in range(3 * TRIALS):
        proxy.plan("slow", method="PUT", times=None, delay=0.05)
        killed += kill_at_random(lambda: dk.spawn("keys", "rewrap"), random.Random(trial), 1.0)
        proxy.clear()
        assert listed(dk, "offsite") == labels
        verified(dk, "offsite")
    assert killed >= 1
    report("keys rewrap", f"{3 * TRIALS} runs, {killed} killed mid-run; every backup readable")
    result = dk.run("keys", "rewrap", "--json")
    assert result.exit_code == 0, result.output
    again = json.loads(dk.ok("keys", "rewrap", "--json").stdout)
    assert again["rewrapped"] == []  # everything carries the escrow part now
    target = workdir / "escrowed"
    dk.ok("restore", "--pgdata", str(target), "--recovery-key", pair["recovery_key_file"])


# -- drill ---------------------------------------------------------------------------------------


def test_drill_killed_at_random_writes_no_partial_record_and_the_next_drill_passes(
    cluster: PgCluster, workdir: Path
) -> None:
    dk = Drkit(cluster, workdir)
    sandbox = workdir / "sandbox"
    dk.ok("init")
    enable_archiving(cluster, dk, sections={"drill": {"sandbox": sandbox}})
    cluster.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 20000) g")
    dk.ok("backup")
    wait_archived(cluster, switch_wal(cluster))
    killed = 0
    for trial in range(2 * TRIALS):
        killed += kill_at_random(lambda: dk.spawn("drill"), random.Random(trial), 4.0)
        drills = json.loads(dk.ok("drill", "list", "--json").stdout)["drills"]
        assert all(d["authentic"] for d in drills)  # a record is whole, or not there
    assert killed >= 1
    report("drill", f"{2 * TRIALS} runs, {killed} killed mid-run; no partial record")
    result = dk.run("drill", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["record"]["outcome"] == "PASS"
    servers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(sandbox) in " ".join(p.info["cmdline"] or [])
    ]
    left = sorted(p.name for p in sandbox.iterdir()) if sandbox.exists() else []
    assert (servers, left) == ([], []), "killed drills left their sandbox"
