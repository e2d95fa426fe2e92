"""Prune end to end against S3 (moto over HTTP) with Object Lock: a locked object is never forced,
drkit reports it and deletes nothing that would orphan it; once retention has passed, prune
finishes and what is kept restores from S3 alone."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rig.drkit import Drkit, start_restored, toml_value
from rig.postgres import PgCluster, database_checksums
from rig.servers import S3Server

PREFIX = "prod/main"


def use_s3(dk: Drkit, server: S3Server, bucket: str, **retention: object) -> None:
    """Point ``dk`` at one S3 repository (instead of the rig's posix one)."""
    dk.write_config(retention=dict(retention))
    text = dk.config.read_text()
    repo = {
        "name": "s3-eu",
        "type": "s3",
        "bucket": bucket,
        "prefix": PREFIX,
        "region": server.region,
        "endpoint_url": server.endpoint_url,
        "max_attempts": 3,
        "offsite": True,
    }
    lines = ["[[repo]]", *(f"{k} = {toml_value(v)}" for k, v in repo.items())]
    dk.config.write_text(text[: text.index("[[repo]]")] + "\n".join(lines) + "\n")


def listing(server: S3Server, bucket: str) -> set[str]:
    """Every object version in the bucket (a delete marker would show as one too), but the
    lease and job records every run writes (``leases/``, ``events/``)."""
    client = server.client()
    found = set()
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket):
        for item in page.get("Versions", []) + page.get("DeleteMarkers", []):
            found.add(item["Key"].removeprefix(f"{PREFIX}/"))
    return {key for key in found if not key.startswith(("leases/", "events/"))}


def take(dk: Drkit, kind: str) -> str:
    return str(json.loads(dk.ok("backup", "--type", kind, "--json").stdout)["label"])


def test_prune_on_s3_respects_object_lock(
    pg: PgCluster, workdir: Path, s3: S3Server, new_bucket: Callable[..., str]
) -> None:
    bucket = new_bucket("drkit-prune", object_lock=True)
    dk = Drkit(pg, workdir)
    use_s3(dk, s3, bucket, full=1)
    dk.ok("init")
    pg.psql("CREATE TABLE t (i int)")
    labels, states = [], {}
    for step, kind in enumerate(["full", "incr", "full", "incr"]):
        pg.psql(f"INSERT INTO t SELECT generate_series({step * 100}, {step * 100 + 99})")
        labels.append(take(dk, kind))
        states[labels[-1]] = database_checksums(pg)
    f1, i1, f2, i2 = labels
    before = listing(s3, bucket)
    doomed = {k for k in before if k.startswith((f"backup/{f1}/", f"backup/{i1}/"))}
    assert doomed and f"backup/{i1}/manifest" in doomed

    dry = dk.run("prune", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["repos"][0]["deleted"] == [i1, f1]
    assert listing(s3, bucket) == before

    # The incr's manifest is under Object Lock for a few seconds (as a repository's object_lock
    # setting would put it for days): prune must skip it, and keep the full it needs
    manifest = f"backup/{i1}/manifest"
    until = datetime.now(UTC) + timedelta(seconds=8)
    s3.client().put_object_retention(
        Bucket=bucket,
        Key=f"{PREFIX}/{manifest}",
        Retention={"Mode": "GOVERNANCE", "RetainUntilDate": until},
    )
    locked = dk.run("prune", "--json")
    assert locked.exit_code == 107, locked.output  # ObjectsLockedSkipped
    [report] = json.loads(locked.stdout)["repos"]
    assert [s["key"] for s in report["skipped"]] == [manifest]
    assert "Object Lock (GOVERNANCE)" in report["skipped"][0]["reason"]
    assert report["deleted"] == []
    assert {h["label"]: h["reason"] for h in report["held"]} == {
        i1: "its manifest is under a retention lock",
        f1: f"needed by {i1}, which stays",
    }
    assert report["error"] is None
    assert listing(s3, bucket) == before  # nothing at all was deleted: no orphan, no gap
    assert [b["label"] for b in dk.info()["backups"]] == labels
    dk.ok("verify")  # the locked backup and its full are whole

    # The plain output says so too, with a warning exit code
    plain = dk.run("prune")
    assert plain.exit_code == 107
    assert f"warning: skipped '{manifest}': object '{manifest}'" in plain.stderr
    assert f"warning: backup '{f1}' was not deleted: needed by {i1}, which stays" in plain.stderr

    # Once retention has passed, prune removes both, manifest first, and nothing else
    time.sleep(max(0.0, (until - datetime.now(UTC)).total_seconds()) + 1.5)
    verified = listing(s3, bucket)  # verify added its (write-once) records
    done = dk.run("prune", "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["repos"][0]["deleted"] == [i1, f1]
    remaining = listing(s3, bucket)  # every version, so no delete marker hides anything
    assert remaining == {
        k for k in verified if not k.startswith((f"backup/{f1}/", f"backup/{i1}/"))
    }
    assert before - doomed <= remaining
    assert [b["label"] for b in dk.info()["backups"]] == [f2, i2]
    dk.ok("verify")

    target = workdir / "restored"
    dk.ok("restore", "--pgdata", str(target), "--backup", i2)
    restored = start_restored(target, pg.version, workdir)
    assert database_checksums(restored) == states[i2]
