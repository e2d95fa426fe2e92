"""Runs of replicate, verify and prune from a timer or a CronJob (the command line, no scheduler)
are remembered in the repository: info, the metrics and the report see their last success and
their failures."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from rig.drkit import Drkit
from rig.postgres import PgCluster

from drkit.config.settings import load_settings
from drkit.errors import BackupNotCopied, VerifyFailed
from drkit.repo.events import read_event
from drkit.repo.open import open_repository


def records(dk: Drkit, job: str) -> list[dict[str, Any]]:
    """The job's records in the primary repository, oldest first (unsealed)."""
    repo = open_repository(load_settings(dk.config))
    return [read_event(repo, o.key) for o in repo.storage.list(f"events/{job}/")]


def metrics(dk: Drkit) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = dk.ok("metrics").stdout
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_replicate_verify_and_prune_record_their_runs(pg: PgCluster, workdir: Path) -> None:
    pg.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 20000) g")
    second = workdir / "second"
    dk = Drkit(pg, workdir, extra_repos=[{"name": "second", "path": second}])
    dk.write_config(retention={"full": 2})
    dk.ok("init")
    dk.ok("backup")

    # Successes: one record each; a dry run is no run of the prune job
    assert dk.run("replicate").exit_code == 0
    assert dk.run("verify").exit_code == 0
    dk.ok("prune", "--dry-run")
    assert records(dk, "prune") == []
    dk.ok("prune")
    for job in ("replicate", "verify", "prune"):
        [record] = records(dk, job)
        assert record["ok"] is True and record["exit_code"] == 0 and record["error"] == ""

    # Failures: the second repository is offline; a backup's object is damaged
    second.rename(workdir / "unmounted")
    failed = dk.run("replicate")
    assert failed.exit_code == BackupNotCopied.exit_code, failed.output
    assert "repository 'second' not caught up" in failed.stderr
    last = records(dk, "replicate")[-1]
    assert last["ok"] is False and last["exit_code"] == BackupNotCopied.exit_code
    assert last["error"].startswith("replication failed for 'second': ")

    pruned = dk.run("prune")
    assert pruned.exit_code != 0, pruned.output
    last = records(dk, "prune")[-1]
    assert last["ok"] is False and last["exit_code"] == pruned.exit_code
    assert last["error"].startswith("prune failed for repository 'second': ")

    data = next((dk.repo_path / "backup").glob("*/data/*"))
    data.chmod(0o600)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    data.write_bytes(bytes(raw))
    assert dk.run("verify").exit_code == VerifyFailed.exit_code
    last = records(dk, "verify")[-1]
    assert (last["ok"], last["exit_code"]) == (False, VerifyFailed.exit_code)
    assert "verification found damage" in last["error"]

    # info shows each job's last runs, a failure newer than the success first
    info = dk.info()
    for job in ("replicate", "verify", "prune"):
        runs = info["jobs"][job]
        assert runs["last_failure"] > runs["last_success"], (job, runs)
    assert info["jobs"]["full"]["last_failure"] is None
    shown = dk.run("info").stdout
    assert "job replicate: FAILED: last failure " in shown
    assert "job full: last success " in shown

    # The metrics: the same times, per job
    found = metrics(dk)
    for job in ("replicate", "verify", "prune"):
        labels = (("job", job), ("repo", "local"))
        ok = found[("drkit_job_last_success_timestamp_seconds", labels)]
        fail = found[("drkit_job_last_failure_timestamp_seconds", labels)]
        first, newest = records(dk, job)[0], records(dk, job)[-1]
        assert ok == datetime.fromisoformat(first["time"]).timestamp()
        assert fail == datetime.fromisoformat(newest["time"]).timestamp()


def repository_bytes(repo: Path) -> int:
    """What drkit_repository_size_bytes must be: every object's bytes, nothing of the temporary
    area, nothing a link points to."""
    return sum(
        os.lstat(Path(root) / name).st_size
        for root, dirs, files in os.walk(repo)
        if ".tmp" not in Path(root).relative_to(repo).parts
        for name in files
        if not (Path(root) / name).is_symlink()
    )


def test_repository_size_metric_is_exact_with_the_size_cache(pg: PgCluster, workdir: Path) -> None:
    """The sizes seen by one run are kept (lock_path) and only new objects are looked at by the
    next: the total stays exact as objects come and go, and a damaged cache is ignored."""
    dk = Drkit(pg, workdir)
    dk.ok("init")
    dk.ok("backup")
    (dk.repo_path / ".tmp").mkdir(exist_ok=True)
    (dk.repo_path / ".tmp" / "write-x.tmp").write_bytes(b"x" * 1000)  # a killed writer's
    (dk.repo_path / "elsewhere").symlink_to(workdir / "backup.key")
    size = ("drkit_repository_size_bytes", (("repo", "local"),))
    assert metrics(dk)[size] == repository_bytes(dk.repo_path)
    [cache] = (workdir / "locks").glob("metrics-sizes-*.json")
    assert cache.stat().st_mode & 0o777 == 0o600
    assert len(json.loads(cache.read_text())["sizes"]) == len(
        [
            p
            for p in dk.repo_path.rglob("*")
            if p.is_file() and not p.is_symlink() and ".tmp" not in p.parts
        ]
    )

    dk.ok("backup", "--type", "incr")  # new objects, looked at once
    dk.ok("backup")
    assert metrics(dk)[size] == repository_bytes(dk.repo_path)
    first = sorted((dk.repo_path / "backup").iterdir())[0]
    dk.ok("prune", "--backup", first.name, "--with-dependents")  # objects gone
    assert not first.exists()
    assert metrics(dk)[size] == repository_bytes(dk.repo_path)

    cache.write_text('{"location": "nonsense", "sizes": {"backup/x": -1}}')
    dk.ok("backup", "--type", "incr")
    assert metrics(dk)[size] == repository_bytes(dk.repo_path)
    cache.write_text("not json")
    assert metrics(dk)[size] == repository_bytes(dk.repo_path)
