"""`drkit replicate` catches drill records up every way, between a local and an S3 repository."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rig.drkit import Drkit
from rig.postgres import PgCluster
from rig.servers import S3Server
from test_drill_list import flip_a_byte
from test_drill_records import make_record

from drkit.config.settings import load_settings
from drkit.repo.drill_copies import write_drill_record_everywhere
from drkit.repo.open import open_repository


def test_replicate_copies_drill_records_to_the_repositories_missing_them(
    pg: PgCluster, workdir: Path, s3: S3Server, new_bucket: Callable[..., str]
) -> None:
    bucket = new_bucket()
    offsite = {
        "name": "s3-eu",
        "type": "s3",
        "bucket": bucket,
        "prefix": "prod/main",
        "endpoint_url": s3.endpoint_url,
        "region": "us-east-1",
        "offsite": True,
        "max_attempts": 2,
    }
    dk = Drkit(pg, workdir, extra_repos=[offsite])
    dk.ok("init")
    dk.write_config(retention={"full": 2})
    settings = load_settings(dk.config)
    local, remote = open_repository(settings, "local"), open_repository(settings, "s3-eu")
    now = datetime.now(UTC)
    everywhere = make_record(now - timedelta(hours=3))
    assert write_drill_record_everywhere(settings, everywhere).written == ["local", "s3-eu"]
    local_only = make_record(now - timedelta(hours=2))  # S3 was down when this drill ran
    local.write_drill_record(local_only)
    remote_only = make_record(now - timedelta(hours=1))  # and here the local disk was
    remote.write_drill_record(remote_only)
    damaged = make_record(now)
    local.write_drill_record(damaged)
    flip_a_byte(dk.repo_path / f"drills/{damaged.id}/record")
    expired = make_record(now - timedelta(days=500))  # older than retention keeps records
    local.write_drill_record(expired)

    result = dk.run("replicate", "--json")

    assert result.exit_code == 0, result.output
    drills = json.loads(result.stdout)["drills"]
    assert drills == {"copied": {"local": [remote_only.id], "s3-eu": [local_only.id]}, "errors": {}}
    client = s3.client()
    prefix = f"prod/main/drills/{local_only.id}/"
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
    assert sorted(o["Key"].removeprefix(prefix) for o in listed) == ["key/0001.json", "record"]
    on_s3 = json.loads(dk.ok("drill", "list", "--repo", "s3-eu", "--json").stdout)["drills"]
    assert [(d["id"], d["authentic"]) for d in on_s3] == [
        (everywhere.id, True),
        (local_only.id, True),
        (remote_only.id, True),
    ]
    assert on_s3[1]["record"] == json.loads(local_only.model_dump_json())
    assert local.drill_record(remote_only.id).record == remote_only

    again = json.loads(dk.ok("replicate", "--json").stdout)["drills"]
    assert again == {"copied": {}, "errors": {}}
