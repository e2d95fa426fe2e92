"""Retention and drills, with the real prune: the backup a passing drill proved stays until a newer
one is proved too; drill records stay at least 400 days and at least the retention window."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rig.drkit import Drkit
from rig.postgres import PgCluster
from rig.servers import S3Server
from test_drill_records import make_record

from drkit.config.settings import load_settings
from drkit.crypto.keyfile import KeyfileProvider, create_keyfile
from drkit.prune.operation import prune_repository
from drkit.repo.drills import DrillOutcome, DrillRecord
from drkit.repo.open import open_repository
from drkit.repo.repository import Repository
from drkit.repo.retention import RetentionPolicy
from drkit.storage.s3 import S3Config, S3Storage


def take(dk: Drkit) -> str:
    return str(json.loads(dk.ok("backup", "--type", "full", "--json").stdout)["label"])


def prune_json(dk: Drkit, *args: str) -> dict[str, Any]:
    result = dk.run("prune", "--json", *args)
    assert result.exit_code == 0, result.output
    [repo] = json.loads(result.stdout)["repos"]
    return dict(repo)


def record(dk: Drkit, drill: DrillRecord) -> str:
    open_repository(load_settings(dk.config)).write_drill_record(drill)
    return drill.id


def drill_ids(dk: Drkit) -> list[str]:
    return open_repository(load_settings(dk.config)).drill_ids()


def test_prune_keeps_the_newest_backup_a_passing_drill_restored(
    pg: PgCluster, workdir: Path
) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    dk.write_config(retention={"full": 1})
    f1 = take(dk)
    proved = record(dk, make_record(backup=f1))
    f2 = take(dk)
    record(dk, make_record(backup=f2, outcome=DrillOutcome.FAIL))  # a failed drill proves nothing
    f3 = take(dk)

    pruned = prune_json(dk)

    assert pruned["deleted"] == [f2]
    kept = {k["label"]: k["reasons"] for k in pruned["kept"]}
    assert kept == {
        f1: [f"newest backup a passing drill restored (drill {proved})"],
        f3: ["newest", "full 1 of 1"],
    }
    assert [b["label"] for b in dk.info()["backups"]] == [f1, f3]

    # Once a newer backup passed a drill, the older proof may go.
    record(dk, make_record(backup=f3))
    assert prune_json(dk)["deleted"] == [f1]
    assert [b["label"] for b in dk.info()["backups"]] == [f3]


def test_drill_records_stay_400_days_and_the_window(pg: PgCluster, workdir: Path) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    label = take(dk)
    now = datetime.now(UTC)
    ancient = record(dk, make_record(now - timedelta(days=700), backup=label))
    old = record(dk, make_record(now - timedelta(days=500), backup=label))
    recent = record(dk, make_record(now - timedelta(days=300), backup=label))

    # A window of 600 days keeps the records of the last 600 days.
    dk.write_config(retention={"full": 1, "window": "600d"})
    dry = prune_json(dk, "--dry-run")
    assert dry["drills_deleted"] == [ancient]
    assert drill_ids(dk) == [ancient, old, recent]

    pruned = prune_json(dk)
    assert pruned["drills_deleted"] == [ancient]
    assert not (dk.repo_path / "drills" / ancient).exists()

    # Without a longer window, 400 days.
    dk.write_config(retention={"full": 1})
    assert prune_json(dk)["drills_deleted"] == [old]
    assert drill_ids(dk) == [recent]
    assert prune_json(dk)["drills_deleted"] == []


def test_a_locked_drill_record_is_skipped_and_stays_readable(
    tmp_path: Path, s3: S3Server, new_bucket: Callable[..., str]
) -> None:
    bucket = new_bucket("drkit-drills", object_lock=True)
    storage = S3Storage(
        S3Config(bucket=bucket, endpoint_url=s3.endpoint_url, region=s3.region, max_attempts=2),
        name="s3-eu",
    )
    create_keyfile(tmp_path / "key")
    repo = Repository(storage, KeyfileProvider(tmp_path / "key"))
    repo.initialize(42)
    now = datetime.now(UTC)
    locked, free = (make_record(now - timedelta(days=days)) for days in (450, 420))
    repo.write_drill_record(locked)
    repo.write_drill_record(free)
    s3.client().put_object_retention(
        Bucket=bucket,
        Key=f"drills/{locked.id}/record",
        Retention={"Mode": "GOVERNANCE", "RetainUntilDate": now + timedelta(hours=1)},
    )

    result = prune_repository(repo, RetentionPolicy(full=1), now)

    assert result.drills_deleted == [free.id]
    assert [s.key for s in result.skipped] == [f"drills/{locked.id}/record"]
    assert repo.drill_ids() == [locked.id]
    assert repo.drill_record(locked.id).record == locked  # its key record was kept with it
