"""Prune end to end on a posix repository: real backups of a real cluster, the real CLI. What is
kept still restores (to its own state, and through the kept WAL to the latest); what is deleted is
gone; a prune killed at any point leaves a repository whose every listed backup verifies."""

from __future__ import annotations

import json
import random
import shutil
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rig.archive import enable_archiving, switch_wal, wait_archived
from rig.drkit import Drkit, start_restored
from rig.faulty import FaultyStorage
from rig.postgres import PgCluster, database_checksums

from drkit.crypto.keyfile import KeyfileProvider
from drkit.prune.operation import prune_repository
from drkit.repo.repository import Repository
from drkit.repo.retention import RetentionPolicy
from drkit.storage.posix import PosixStorage


def take(dk: Drkit, kind: str) -> str:
    return str(json.loads(dk.ok("backup", "--type", kind, "--json").stdout)["label"])


def prune_json(dk: Drkit, *args: str, code: int = 0) -> dict[str, Any]:
    result = dk.run("prune", "--json", *args)
    assert result.exit_code == code, result.output
    [repo] = json.loads(result.stdout)["repos"]
    return dict(repo)


def wait_promoted(cluster: PgCluster, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while cluster.psql("SELECT pg_is_in_recovery()") != "f":
        assert time.monotonic() < deadline, cluster.log_tail()
        time.sleep(0.2)


def test_prune_keeps_what_restores_and_removes_the_rest(pg: PgCluster, workdir: Path) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    enable_archiving(pg, dk)
    dk.write_config(
        archive={"async": False, "spool_path": workdir / "spool"}, retention={"full": 2}
    )
    pg.psql("CREATE TABLE t (i int, pad text)")
    labels, states = [], {}
    for step, kind in enumerate(["full", "incr", "full", "incr", "full"]):
        pg.psql(
            "INSERT INTO t SELECT g, md5(g::text) FROM"
            f" generate_series({step * 1000 + 1}, {step * 1000 + 1000}) g"
        )
        label = take(dk, kind)
        labels.append(label)
        states[label] = database_checksums(pg)
    f1, i1, f2, i2, f3 = labels
    pg.psql("UPDATE t SET pad = 'after the last backup' WHERE i % 10 = 0")
    wait_archived(pg, switch_wal(pg))
    latest = database_checksums(pg)
    f2_start = dk.info()["backups"][2]["wal"].split("..")[0]
    before = dk.repo_listing()

    # A dry run lists exactly what will go, and deletes nothing
    dry = prune_json(dk, "--dry-run")
    assert dk.repo_listing() == before
    assert dry["deleted"] == [i1, f1]
    assert [k["label"] for k in dry["kept"]] == [f2, i2, f3]
    assert dry["wal_cuts"] == [{"timeline": 1, "below": f2_start}]
    assert dry["wal_deleted"], "the archive holds WAL from before the oldest kept backup"
    assert all(name[8:24] < f2_start[8:24] for name in dry["wal_deleted"])

    real = prune_json(dk)
    # the drill records' cut-off is counted from each run's own clock
    assert {k: v for k, v in real.items() if k not in ("dry_run", "drills_kept_since")} == {
        k: v for k, v in dry.items() if k not in ("dry_run", "drills_kept_since")
    }
    gone = set(before) - set(dk.repo_listing())
    assert gone == {
        key
        for key in before
        if key.startswith((f"backup/{f1}/", f"backup/{i1}/"))
        or key.removeprefix("wal/00000001/") in dry["wal_deleted"]
    }
    info = dk.info()
    assert [b["label"] for b in info["backups"]] == [f2, i2, f3]
    assert info["incomplete"] == []
    assert info["wal"][0]["first"] == f2_start and info["wal"][0]["missing_count"] == 0
    assert prune_json(dk)["deleted"] == []  # nothing more to do
    dk.ok("verify")

    # Every kept backup restores to its own state (the incr through its chain) ...
    for label in (i2, f3):
        target = workdir / f"restored-{label}"
        dk.ok("restore", "--pgdata", str(target), "--backup", label)
        restored = start_restored(target, pg.version, workdir)
        assert database_checksums(restored) == states[label], label
        restored.stop()
    # ... and the oldest kept one replays the kept WAL up to the latest change
    target = workdir / "pitr"
    dk.ok("restore", "--pgdata", str(target), "--backup", f2, "--target-latest")
    restored = start_restored(target, pg.version, workdir)
    wait_promoted(restored)
    assert database_checksums(restored) == latest


def test_a_prune_killed_midway_leaves_every_listed_backup_whole(
    pg: PgCluster, workdir: Path
) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    dk.write_config(retention={"full": 1})
    f1 = take(dk, "full")
    pg.psql("CREATE TABLE t AS SELECT generate_series(1, 5000) AS i")
    i1 = take(dk, "incr")
    f2 = take(dk, "full")
    doomed = [k for k in dk.repo_listing() if k.startswith((f"backup/{f1}/", f"backup/{i1}/"))]
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    points = sorted({1, 2, len(doomed) // 2, len(doomed), rng.randint(1, len(doomed))})

    for crash_at in points:
        copy = copy_of(dk, workdir / f"crash-{crash_at}")
        storage = FaultyStorage(PosixStorage(copy.repo_path))
        for _ in range(crash_at - 1):
            storage.add_fault("delete", hook=lambda: None)
        storage.add_fault("delete", SystemExit(137))  # dies right there, nothing cleaned up
        assert copy.keyfile is not None
        repo = Repository(storage, KeyfileProvider(copy.keyfile))
        try:
            prune_repository(repo, RetentionPolicy(full=1), datetime.now(UTC))
            raise AssertionError("the prune was not interrupted")
        except SystemExit:
            pass
        assert_whole(copy, f"crash at delete {crash_at} of {len(doomed)} (seed {seed})")
        copy.ok("prune")
        assert [b["label"] for b in copy.info()["backups"]] == [f2]
        assert copy.info()["incomplete"] == []

    # And a real process killed with SIGKILL at a random moment
    copy = copy_of(dk, workdir / "sigkill")
    proc = copy.spawn("prune")
    time.sleep(rng.uniform(0.2, 1.5))
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert_whole(copy, f"SIGKILL (seed {seed})")
    copy.ok("prune")
    assert [b["label"] for b in copy.info()["backups"]] == [f2]


def copy_of(dk: Drkit, where: Path) -> Drkit:
    where.mkdir()
    copy = Drkit(dk.cluster, where, keyfile=dk.keyfile)
    shutil.copytree(dk.repo_path, copy.repo_path)
    copy.write_config(retention={"full": 1})
    return copy


def assert_whole(dk: Drkit, what: str) -> None:
    """`drkit verify` reads every listed backup back, chain included, and finds nothing wrong."""
    result = dk.run("verify", "--json")
    assert result.exit_code == 0, f"{what}: {result.output}"
    report = json.loads(result.stdout)
    assert report["ok"] and report["backups"], what
