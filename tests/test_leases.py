"""Two hosts, one repository: the lease in the repository (drkit/repo/lease.py).

The host-local lock cannot see a second host. These tests act as two hosts — two configurations
with their own lock directory and ``[lease] host`` — on one posix repository and on one S3
repository (moto over HTTP): the second host's backup and prune refuse to run beside the first
host's backup in progress and delete nothing of it; a lease that expired without being released
is taken over, and what the dead host left is removed only once it is old enough.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from rig.drkit import Drkit, toml_value
from rig.postgres import PgCluster
from rig.servers import S3Server

from drkit.config.lease import LeaseSettings
from drkit.config.settings import load_settings
from drkit.errors import ConfigError, LeaseHeld, LeaseLost, ObjectExists
from drkit.repo.label import BackupLabel
from drkit.repo.lease import LeaseRecord, RepositoryLease, current_lease, lease_generations
from drkit.repo.open import open_storage
from drkit.storage.base import Storage
from drkit.storage.posix import PosixStorage
from drkit.storage.s3 import ObjectLock, S3Config, S3Storage


class Clock:
    """A settable clock: a lease's expiry is tested without waiting for it."""

    def __init__(self) -> None:
        self.now = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(params=["posix", "s3"])
def storage(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Storage:
    if request.param == "posix":
        return PosixStorage(tmp_path / "repo", name="shared")
    server: S3Server = request.getfixturevalue("s3_server")
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    bucket = f"drkit-lease-{uuid.uuid4().hex[:12]}"
    server.client().create_bucket(Bucket=bucket)
    config = S3Config(
        bucket=bucket, endpoint_url=server.endpoint_url, region=server.region, max_attempts=2
    )
    return S3Storage(config, name="shared")


def lease(storage: Storage, host: str, clock: Clock, operation: str = "backup") -> RepositoryLease:
    settings = LeaseSettings(host=host, ttl=timedelta(minutes=5), grace=timedelta(seconds=30))
    return RepositoryLease(storage, "backup", operation, settings, clock)


def test_one_holder_at_a_time_across_hosts(storage: Storage) -> None:
    clock = Clock()
    first = lease(storage, "host-a", clock)
    first.acquire()
    try:
        with pytest.raises(LeaseHeld) as held:
            lease(storage, "host-b", clock, "prune").acquire()
        assert "another backup holds the backup lease of repository 'shared'" in held.value.message
        assert "on host 'host-a'" in held.value.message and held.value.exit_code == 38
        assert "HINT" not in held.value.message and held.value.hint
    finally:
        first.release()
    record = current_lease(storage, "backup")
    assert record is not None and record.released and record.host == "host-a"
    second = lease(storage, "host-b", clock, "prune")
    second.acquire()
    second.release()
    # Superseded generations are removed: one record is left, the released one.
    assert [g for g, _ in lease_generations(storage, "backup")] == [4]


def test_two_hosts_racing_for_a_free_lease_one_wins(storage: Storage) -> None:
    """Both look, both see it free; the conditional create lets exactly one write the next
    generation."""
    clock = Clock()
    a, b = lease(storage, "host-a", clock), lease(storage, "host-b", clock)
    assert current_lease(storage, "backup") is None  # both saw it free ...
    a.acquire()
    # ... host-b's write of the same generation loses to host-a's
    b_record = LeaseRecord("backup", 1, "host-b", 1, "backup", "x", clock(), clock())
    with pytest.raises(ObjectExists):
        storage.write_bytes(b_record.key, b_record.encode())
    with pytest.raises(LeaseHeld):
        b.acquire()
    a.release()


def test_an_expired_lease_of_another_host_is_taken_over_and_its_holder_stops(
    storage: Storage,
) -> None:
    clock = Clock()
    stalled = lease(storage, "host-a", clock)
    stalled.acquire()
    stalled._stop.set()  # a host that hangs: it renews no more
    clock.now += timedelta(minutes=5, seconds=20)
    with pytest.raises(LeaseHeld):  # expired, but within the grace for clock differences
        lease(storage, "host-b", clock).acquire()
    clock.now += timedelta(seconds=15)
    taker = lease(storage, "host-b", clock)
    taker.acquire()
    try:
        assert taker.taken_over is not None and taker.taken_over.exit_code == 115
        assert "from backup on host 'host-a'" in taker.taken_over.message
        # What host-a may still be writing is left until it is older than leftover_age
        young = BackupLabel.new(BackupLabel("20261207-115500F").type, clock.now)
        old = BackupLabel("20261207-100000F")
        assert not taker.may_remove(young) and taker.may_remove(old)
        # The stalled host wakes up: its own clock says expired, and its renewal finds the
        # next generation taken. It stops before making anything visible.
        with pytest.raises(LeaseLost) as lost:
            stalled.check()
        assert lost.value.exit_code == 39 and "expired at" in lost.value.message
        stalled._lost = None
        clock.now -= timedelta(minutes=5)  # even with a clock that still says valid
        stalled.renew()
        with pytest.raises(LeaseLost, match="another host took it over"):
            stalled.check()
    finally:
        taker.release()
        stalled.release()
    record = current_lease(storage, "backup")
    assert record is not None and record.host == "host-b" and record.released


def test_renewal_keeps_the_lease_and_a_killed_holder_on_this_host_is_taken_at_once(
    storage: Storage,
) -> None:
    clock = Clock()
    holder = lease(storage, "host-a", clock)
    holder.acquire()
    holder._stop.set()
    for _ in range(4):  # an operation running for 16 minutes, renewing every 4
        clock.now += timedelta(minutes=4)
        holder.renew()
        holder.check()
    with pytest.raises(LeaseHeld):
        lease(storage, "host-b", clock).acquire()
    # A holder killed on this host: its pid no longer runs, so the lease is free at once
    record = current_lease(storage, "backup")
    assert record is not None
    killed = replace(record, generation=record.generation + 1, pid=_dead_pid())
    storage.write_bytes(killed.key, killed.encode())
    again = lease(storage, "host-a", clock)
    again.acquire()
    assert again.taken_over is None  # this host knows its holder is gone: no warning
    again.release()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_record_drkit_did_not_write_is_refused_clearly(storage: Storage) -> None:
    storage.write_bytes("leases/backup/000000000001.json", b"not json")
    with pytest.raises(LeaseHeld) as refused:
        lease(storage, "host-a", Clock()).acquire()
    assert "'leases/backup/000000000001.json' is not one drkit wrote" in refused.value.message
    assert "remove the object" in (refused.value.hint or "")


# -- two hosts running drkit ----------------------------------------------------------------------


def second_host(dk: Drkit, workdir: Path, host: str) -> Drkit:
    """The same cluster and repository as ``dk``, seen from another host: its own lock
    directory, its own [lease] host."""
    (workdir / host).mkdir()
    other = Drkit(dk.cluster, workdir / host, keyfile=dk.keyfile, repo=dk.repo_path)
    other.extra_repos = dk.extra_repos
    other.backup = dk.backup
    return other


def configure(dk: Drkit, host: str, s3_repo: dict[str, Any] | None, **sections: Any) -> None:
    dk.write_config(lease={"host": host}, **sections)
    if s3_repo is not None:  # the one repository is in S3 instead
        text = dk.config.read_text()
        lines = ["[[repo]]", *(f"{k} = {toml_value(v)}" for k, v in s3_repo.items())]
        dk.config.write_text(text[: text.index("[[repo]]")] + "\n".join(lines) + "\n")


@pytest.fixture(params=["posix", "s3"])
def two_hosts(
    request: pytest.FixtureRequest,
    pg: PgCluster,
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[Drkit, Drkit]]:
    s3_repo = None
    if request.param == "s3":
        server: S3Server = request.getfixturevalue("s3")
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        bucket = f"drkit-hosts-{uuid.uuid4().hex[:12]}"
        server.client().create_bucket(Bucket=bucket)
        s3_repo = {
            "name": "shared",
            "type": "s3",
            "bucket": bucket,
            "prefix": "prod/main",
            "region": server.region,
            "endpoint_url": server.endpoint_url,
            "max_attempts": 2,
        }
    # Enough data for a backup that runs for a while with one worker
    pg.psql(
        ";".join(
            f"CREATE TABLE filler{i} AS SELECT g, md5(random()::text) AS v"
            " FROM generate_series(1, 60000) g"
            for i in range(6)
        )
    )
    (workdir / "host-a").mkdir()
    a = Drkit(pg, workdir / "host-a", backup={"process_max": 1})
    configure(a, "host-a", s3_repo, retention={"full": 1})
    b = second_host(a, workdir, "host-b")
    configure(b, "host-b", s3_repo, retention={"full": 1})
    a.ok("init")
    yield a, b


def incomplete_objects(dk: Drkit) -> Callable[[], dict[str, list[str]]]:
    settings = load_settings(dk.config)
    storage = open_storage(settings.repo[0])

    def listing() -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for obj in storage.list("backup/"):
            found.setdefault(obj.key.split("/")[1], []).append(obj.key)
        return {
            label: keys
            for label, keys in found.items()
            if not any(k.endswith("/manifest") for k in keys)
        }

    return listing


def paused_mid_backup(
    dk: Drkit, incomplete: Callable[[], dict[str, list[str]]]
) -> tuple[subprocess.Popen[str], str]:
    """Start a backup on ``dk``'s host and stop it (SIGSTOP) once it has stored a data object:
    a backup in progress, for as long as the test needs."""
    proc = dk.spawn("backup")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if found := incomplete():
            proc.send_signal(signal.SIGSTOP)
            [label] = found
            return proc, label
        time.sleep(0.01)
    raise AssertionError(f"the backup stored nothing while running: {proc.communicate()}")


def age_lease(dk: Drkit, by: timedelta) -> None:
    """Make the newest lease record look as if its host died ``by`` ago (what the repository
    holds when a host vanished an hour ago)."""
    storage = open_storage(load_settings(dk.config).repo[0])
    record = current_lease(storage, "backup")
    assert record is not None and not record.released
    aged = replace(
        record,
        generation=record.generation + 1,
        acquired=record.acquired - by,
        expires=record.expires - by,
    )
    storage.write_bytes(aged.key, aged.encode())


def test_a_second_host_never_deletes_a_backup_in_progress_and_takes_over_an_expired_lease(
    two_hosts: tuple[Drkit, Drkit],
) -> None:
    a, b = two_hosts
    first = json.loads(a.ok("backup", "--json").stdout)["label"]
    incomplete = incomplete_objects(a)
    proc, running = paused_mid_backup(a, incomplete)
    try:
        stored = incomplete()[running]
        # host-b's backup and prune refuse to run beside it: exit 38, naming host-a
        busy = b.run("backup")
        assert busy.exit_code == 38, busy.output
        assert "holds the backup lease of repository" in busy.stderr
        assert "on host 'host-a'" in busy.stderr and "HINT:" in busy.stderr
        pruned = b.run("prune", "--json")
        assert pruned.exit_code == 38, pruned.output
        assert "on host 'host-a'" in json.loads(pruned.stdout)["repos"][0]["error"]
        assert incomplete()[running] == stored  # nothing of it was deleted
        # host-b's info shows it as a backup running on host-a, not as a leftover
        seen = json.loads(b.run("info", "--json").stdout)
        assert seen["running"]["host"] == "host-a" and seen["running"]["label"] == running
        assert running not in seen["incomplete"]
        assert "backup running on host 'host-a' since" in b.run("info").stdout
        # The backup goes on and completes, whole
        proc.send_signal(signal.SIGCONT)
        assert proc.wait(timeout=300) == 0, proc.communicate()
    finally:
        proc.kill()
        proc.wait()
    assert running not in incomplete()
    assert [x["label"] for x in b.info()["backups"]] == [first, running]

    # host-a dies in the middle of its next backup
    proc, dead = paused_mid_backup(a, incomplete)
    proc.kill()
    proc.wait()
    assert b.run("backup").exit_code == 38  # its lease has not expired yet

    # An hour later: host-b takes the lease over (warning 115) and keeps the dead host's
    # objects, which are younger than leftover_age ...
    age_lease(a, timedelta(hours=1))
    taken = b.run("backup", "--json")
    assert taken.exit_code == 115, taken.output
    assert "from backup on host 'host-a'" in (taken.stderr)
    assert json.loads(taken.stdout)["removed_leftovers"] == []
    assert dead in incomplete()
    # ... which a later run of host-b, holding a lease released in order, removes
    again = json.loads(b.ok("backup", "--json").stdout)
    assert again["removed_leftovers"] == [dead] and incomplete() == {}
    b.ok("verify")
    # host-a is back: its lease is free, it runs as before
    assert a.run("prune").exit_code == 0


def test_under_object_lock_lease_records_are_retained_only_briefly(
    s3_server: S3Server, new_bucket: Callable[..., str]
) -> None:
    """A repository whose objects are retained for 30 days still lets superseded lease records
    go soon: each is retained only until a minute after its expiry plus grace."""
    bucket = new_bucket("drkit-lease-lock", object_lock=True)
    client = s3_server.client()
    config = S3Config(
        bucket=bucket,
        endpoint_url=s3_server.endpoint_url,
        region=s3_server.region,
        max_attempts=2,
        object_lock=ObjectLock("COMPLIANCE", 30),
    )
    storage = S3Storage(config, name="locked")
    holder = RepositoryLease(storage, "backup", "backup", LeaseSettings(host="host-a"))
    holder.acquire()
    holder.release()
    [(generation, key)] = lease_generations(storage, "backup")[-1:]
    record = current_lease(storage, "backup")
    assert record is not None and record.released and record.generation == generation
    head = client.head_object(Bucket=bucket, Key=key)
    until = head["ObjectLockRetainUntilDate"]
    assert head["ObjectLockMode"] == "COMPLIANCE"
    # expiry (5 min) + grace (30 s) + a minute, not the repository's 30 days
    assert until <= datetime.now(UTC) + timedelta(minutes=7)
    assert until >= record.expires + timedelta(seconds=30)


def test_the_host_name_comes_from_the_configuration_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "drkit.toml"
    base = (
        f'lock_path = "{tmp_path / "locks"}"\n[postgres]\npgdata = "{tmp_path / "pgdata"}"\n'
        f'[keys]\nprovider = "keyfile"\nkeyfile = "{tmp_path / "key"}"\n'
        f'[[repo]]\nname = "local"\npath = "{tmp_path / "repo"}"\n'
    )
    config.write_text(base)
    assert load_settings(config).lease.host == socket.gethostname()
    monkeypatch.setenv("DRKIT_LEASE__HOST", "db-2.example")  # e.g. a pod's name
    settings = load_settings(config)
    assert settings.lease.host == "db-2.example" and settings.lease.ttl == timedelta(minutes=5)
    monkeypatch.delenv("DRKIT_LEASE__HOST")
    config.write_text(base + '[lease]\nhost = "a/b"\n')
    with pytest.raises(ConfigError, match="must not contain '/'"):
        load_settings(config)
    config.write_text(base + '[lease]\nttl = "0s"\n')
    with pytest.raises(ConfigError, match="ttl must be positive"):
        load_settings(config)
