"""Two hosts, one S3 repository, for replicate and ``keys rewrap`` (drkit/repo/lease.py).

Each host is a drkit process with its own configuration: its own lock directory and
``[lease] host``. Host A reaches the bucket through a fault proxy that holds one of its writes,
so host A is mid-operation, holding the lease, for exactly as long as the test needs; host B
talks to the same moto bucket directly. While A works, B's replicate leaves the repository to
it (warning 100, naming host A) and B's rewrap is refused (38); nothing is copied or rewrapped
twice, nothing is lost. A lease left by a host that died is taken over once it expired (115).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from rig.drkit import Drkit
from rig.faultproxy import PlannedFault, S3FaultProxy
from rig.postgres import PgCluster
from rig.servers import S3Server
from test_leases import configure, second_host
from typer.testing import CliRunner

from drkit.cli.main import app
from drkit.config.settings import load_settings
from drkit.repo.lease import LeaseRecord, current_lease
from drkit.repo.open import open_storage
from drkit.storage.base import Storage


@pytest.fixture
def bucket(new_bucket: Callable[..., str]) -> str:
    return new_bucket("drkit-two-hosts")


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[S3FaultProxy]:
    with S3FaultProxy(s3_server.direct_endpoint_url) as proxy:
        yield proxy
        proxy.release(drop=True)  # never leave a request held


def s3_repo(server: S3Server, bucket: str, endpoint: str, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "s3",
        "bucket": bucket,
        "prefix": f"prod/{name}",
        "region": server.region,
        "endpoint_url": endpoint,
        "max_attempts": 2,
        "read_timeout": 30,
    }


def wait_held(planned: PlannedFault, proc: subprocess.Popen[str]) -> None:
    """Wait until the proxy holds host A's request: A is mid-operation, lease held."""
    deadline = time.monotonic() + 60
    while planned.fired == 0:
        if proc.poll() is not None:
            raise AssertionError(f"host A ended before the held request: {proc.communicate()}")
        assert time.monotonic() < deadline, "host A never sent the request to hold"
        time.sleep(0.02)


def finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    return dict(json.loads(out))


def objects(storage: Storage, prefix: str = "") -> dict[str, int]:
    return {o.key: o.size for o in storage.list(prefix) if not o.key.startswith("leases/")}


def key_records(storage: Storage) -> set[str]:
    """Every key record: of backups and the signing key (``.../key/``), of WAL key periods."""
    return {k for k in objects(storage) if "/key/" in k or k.startswith("wal-keys/")}


def dead_holder(storage: Storage, scope: str, operation: str) -> None:
    """The lease as a host that died an hour ago leaves it: held by host A, long expired."""
    last = current_lease(storage, scope)
    now = datetime.now(UTC)
    record = LeaseRecord(
        scope=scope,
        generation=(last.generation + 1) if last else 1,
        host="host-a",
        pid=4242,
        operation=operation,
        token="dead",
        acquired=now - timedelta(hours=1, minutes=5),
        expires=now - timedelta(hours=1),
    )
    storage.write_bytes(record.key, record.encode())


def test_replicate_on_two_hosts_copies_each_backup_once(
    pg: PgCluster, workdir: Path, s3_server: S3Server, bucket: str, proxy: S3FaultProxy
) -> None:
    (workdir / "host-a").mkdir()
    a = Drkit(pg, workdir / "host-a", backup={"process_max": 1})  # one copy at a time
    a.write_config(lease={"host": "host-a"})
    a.ok("init")
    label = json.loads(a.ok("backup", "--json").stdout)["label"]
    # The offsite repository, added later: host A reaches it through the proxy, B directly
    b = second_host(a, workdir, "host-b")
    a.extra_repos = [s3_repo(s3_server, bucket, proxy.endpoint_url, "offsite")]
    b.extra_repos = [s3_repo(s3_server, bucket, s3_server.endpoint_url, "offsite")]
    a.write_config(lease={"host": "host-a"})
    b.write_config(lease={"host": "host-b"})
    a.ok("init")
    settings = load_settings(b.config)
    primary, offsite = open_storage(settings.repo[0]), open_storage(settings.repo[1])

    planned = proxy.plan("hold", method="PUT", match="/data/", delay=60)
    proc = a.spawn("replicate", "--json")
    try:
        wait_held(planned, proc)
        before = objects(offsite)
        # Host B's replicate leaves the repository to host A, says so, and writes nothing
        busy = b.run("replicate", "--json")
        assert busy.exit_code == 100, busy.output
        [entry] = json.loads(busy.stdout)["repos"]
        assert entry["locked"] and entry["copied_backups"] == []
        assert "holds the backup lease of repository 'offsite'" in entry["error"]
        assert "replicate on host 'host-a'" in entry["error"]
        assert "HINT: another backup, prune or replicate is writing there" in busy.stderr
        assert objects(offsite) == before
        proxy.release()
    finally:
        copied = finish(proc)
    assert copied["repos"][0]["copied_backups"] == [label]

    # Nothing left to do for host B; every object of the backup is there once, as in the primary
    again = json.loads(b.ok("replicate", "--json").stdout)
    assert again["repos"][0]["copied_backups"] == [] and again["repos"][0]["objects"] == 0
    assert objects(offsite, f"backup/{label}/") == objects(primary, f"backup/{label}/")
    assert list(objects(primary, "copies/")) == [f"copies/{label}/offsite.json"]

    # Host A died holding the lease an hour ago: host B takes it over, and says so
    dead_holder(offsite, "backup", "replicate")
    taken = b.run("replicate", "--json")
    assert taken.exit_code == 115, taken.output
    assert "took over the backup lease of repository 'offsite'" in taken.stderr
    assert "from replicate on host 'host-a'" in taken.stderr
    b.ok("verify", "--repo", "offsite")


def test_rewrap_on_two_hosts_rewraps_each_set_once(
    pg: PgCluster, workdir: Path, s3_server: S3Server, bucket: str, proxy: S3FaultProxy
) -> None:
    (workdir / "host-a").mkdir()
    a = Drkit(pg, workdir / "host-a")
    b = second_host(a, workdir, "host-b")
    through_proxy = s3_repo(s3_server, bucket, proxy.endpoint_url, "shared")
    direct = s3_repo(s3_server, bucket, s3_server.endpoint_url, "shared")
    configure(a, "host-a", through_proxy)
    a.ok("init")
    a.ok("backup")
    # Escrow configured later: rewrap has a new record to write for every set
    offline = workdir / "offline"
    offline.mkdir()
    made = CliRunner().invoke(app, ["keys", "escrow-init", "--out", str(offline / "recovery")])
    assert made.exit_code == 0, made.output
    escrow = {"keys.escrow": {"public_key_file": offline / "recovery.pub"}}
    configure(a, "host-a", through_proxy, **escrow)
    configure(b, "host-b", direct, **escrow)
    storage = open_storage(load_settings(b.config).repo[0])
    records = key_records(storage)

    planned = proxy.plan("hold", method="PUT", match="/key/", delay=60)
    proc = a.spawn("keys", "rewrap", "--json")
    try:
        wait_held(planned, proc)
        busy = b.run("keys", "rewrap")
        assert busy.exit_code == 38, busy.output
        assert "another rewrap holds the rewrap lease of repository 'shared'" in busy.stderr
        assert "on host 'host-a'" in busy.stderr and "HINT:" in busy.stderr
        assert key_records(storage) == records
        proxy.release()
    finally:
        rewrapped = finish(proc)
    sets = {r["new_record"].rsplit("/", 1)[0] for r in rewrapped["rewrapped"]}
    assert sets == {k.rsplit("/", 1)[0] for k in records}  # every set, the backup's included
    assert all(r["escrow_added"] for r in rewrapped["rewrapped"])

    # Host B finds every set done: one new record each, none twice
    again = json.loads(b.ok("keys", "rewrap", "--json").stdout)
    assert again["rewrapped"] == [] and again["up_to_date"] == len(sets)
    after = sorted(key_records(storage))
    assert after == sorted(f"{s}/{n:04d}.json" for s in sets for n in (1, 2))

    # Host A died holding the lease an hour ago: host B takes it over, and says so
    dead_holder(storage, "rewrap", "rewrap")
    taken = b.run("keys", "rewrap")
    assert taken.exit_code == 115, taken.output
    assert "from rewrap on host 'host-a'" in taken.stderr
