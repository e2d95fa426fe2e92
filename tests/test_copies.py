"""3-2-1 copies: fan-out to S3, restore from S3 alone, per-object fallback, catching up."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rig.archive import enable_archiving, switch_wal, wait_archived
from rig.drkit import Drkit, start_restored
from rig.postgres import PgCluster, chown_to_server_user, database_checksums
from rig.servers import S3Server

from drkit.config.settings import load_settings
from drkit.errors import IntegrityError
from drkit.repo.fanout import FanOut
from drkit.repo.label import BackupLabel
from drkit.repo.manifest import ObjectEntry
from drkit.repo.open import open_repository


@pytest.fixture
def two_repos(pg: PgCluster, workdir: Path, s3, new_bucket) -> Drkit:  # type: ignore[no-untyped-def]
    """A cluster with data, a local repository and an offsite S3 repository (moto over HTTP)."""
    bucket = new_bucket()
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
        # S3's smallest parts and ranges: objects of a few MiB are written in parts and read
        # back as parallel ranged GETs
        "part_size": 5 * 1024 * 1024,
        "multipart_threshold": 5 * 1024 * 1024,
    }
    dk = Drkit(pg, workdir, extra_repos=[s3_repo])
    dk.ok("init")
    return dk


def s3_keys(s3: S3Server, dk: Drkit) -> Callable[[], list[str]]:
    """Lists the keys below backup/ in the S3 repository of ``dk`` (relative to its prefix)."""
    client, repo = s3.client(), dk.extra_repos[0]
    base = f"{repo['prefix']}/"

    def keys() -> list[str]:
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=repo["bucket"], Prefix=f"{base}backup/"
        )
        return sorted(o["Key"][len(base) :] for page in pages for o in page.get("Contents", []))

    return keys


def slow_backup(dk: Drkit) -> None:
    """About 80 MiB more in a dozen tables, each its own data object, stored one after another
    (one worker): a backup that runs for seconds after its first object is committed."""
    dk.cluster.psql(
        ";".join(
            f"CREATE TABLE filler{i} AS SELECT g, md5(random()::text) AS v"
            " FROM generate_series(1, 100000) g"
            for i in range(12)
        )
    )
    dk.backup["process_max"] = 1
    dk.write_config()


def streamed_while_running(
    proc: subprocess.Popen[str], keys: Callable[[], list[str]], dk: Drkit
) -> str:
    """Wait until a data object of the running backup is in S3 while the backup is not complete
    in the primary; returns the backup's label."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        data = [k for k in keys() if "/data/" in k]
        if data:
            label = data[0].split("/")[1]
            # Looked at after S3: the object was there before the backup was listed anywhere.
            assert not (dk.repo_path / "backup" / label / "manifest").exists()
            return label
        time.sleep(0.02)
    raise AssertionError(f"no object was streamed while the backup ran: {proc.communicate()}")


def listed_in(dk: Drkit, repo: str) -> dict[str, Any]:
    """``drkit info --repo REPO --json``: what that repository lists (and its leftovers)."""
    result = dk.run("info", "--repo", repo, "--json")
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_backup_fans_out_and_restores_from_s3_alone(
    two_repos: Drkit, workdir: Path, s3: S3Server
) -> None:
    dk, pg = two_repos, two_repos.cluster
    # About 8 MiB of incompressible rows: a data object of more than one 5 MiB range
    pg.psql(
        "CREATE TABLE blobs AS SELECT g, decode(md5(random()::text) || md5(random()::text)"
        " || md5(random()::text), 'hex') AS b FROM generate_series(1, 150000) g"
    )
    backup = json.loads(dk.ok("backup", "--json").stdout)
    label = backup["label"]
    expected = database_checksums(pg)
    # Data objects were streamed to S3 while the backup ran; the final copy added the rest (the
    # key record and the manifest, at least) and copied nothing twice.
    [copy] = backup["copies"]
    assert copy["repo"] == "s3-eu" and copy["copied_backups"] == [label]
    assert copy["error"] is None and copy["stream_error"] is None
    assert copy["streamed"] >= 1 and copy["objects"] >= 2
    in_s3 = [k for k in s3_keys(s3, dk)() if k.startswith(f"backup/{label}/")]
    assert copy["streamed"] + copy["objects"] == len(in_s3)
    repo = dk.extra_repos[0]
    sizes = [
        s3.client().head_object(Bucket=repo["bucket"], Key=f"{repo['prefix']}/{key}")
        for key in in_s3
    ]
    assert max(head["ContentLength"] for head in sizes) > 5 * 1024 * 1024  # ranges in parallel
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
    assert result.exit_code == 103, result.output  # RepositoryUnreachable: restored, from s3-eu
    restored = json.loads(result.stdout)
    assert restored["label"] == label and restored["repo"] == "s3-eu"
    assert [w["warning"] for w in restored["warnings"]] == ["RepositoryUnreachable"]
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
    assert result.exit_code == 106, result.output  # CopyFallback: restored, the local copy is bad
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
    assert result.exit_code == 100, result.output  # BackupNotCopied: committed, not copied
    label = json.loads(result.stdout)["label"]
    assert f"backup {label} is not yet copied to repository 's3-eu'" in result.stderr
    assert "drkit replicate" in result.stderr
    info = dk.run("info", "--json")
    assert info.exit_code == 1  # warnings of two kinds: RepositoryUnreachable, Rule321Failed
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
    assert result.exit_code == 100 and "repository 'vault-room' is not initialized" in result.stderr
    old = json.loads(result.stdout)["label"]
    assert not second.exists()  # a missing repository is never created behind the operator
    (workdir / "unmounted").rename(second)
    new = json.loads(dk.ok("backup", "--json").stdout)["label"]

    report = json.loads(dk.ok("replicate", "--json").stdout)
    assert report["repos"][0]["copied_backups"] == []  # the old full would be pruned there
    holders = {b["label"]: b["copies"]["repos"] for b in dk.info()["backups"]}
    assert holders == {old: ["local"], new: ["local", "vault-room"]}

    # A backup's fan-out streams data objects before the target's retention can decide; when it
    # drops the backup at once, what was streamed is deleted again (here: the old full, streamed
    # after the fact).
    settings = load_settings(dk.config)
    primary = open_repository(settings)
    manifest, _ = primary.load_manifest(BackupLabel(old))
    with FanOut(settings, primary) as fanout:
        fanout.start(int(manifest.system_identifier))
        for obj in manifest.objects:  # as a backup writing them would
            if (copies := fanout.begin(obj.key)) is not None:  # None: all copy threads busy
                copies.write(primary.storage.read_bytes(obj.key))
                copies.committed(obj)
        [copy] = fanout.finish(BackupLabel(old)).repos
    assert copy.error is None and copy.copied_backups == [] and copy.streamed >= 1
    assert not [p for p in (second / "backup").rglob("*") if p.is_file() and old in str(p)]
    assert [b["label"] for b in listed_in(dk, "vault-room")["backups"]] == [new]


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


def test_killed_backup_is_never_listed_in_s3_and_the_next_backup_removes_its_objects(
    two_repos: Drkit, s3: S3Server
) -> None:
    dk = two_repos
    slow_backup(dk)
    keys = s3_keys(s3, dk)
    proc = dk.spawn("backup")
    try:
        label = streamed_while_running(proc, keys, dk)
        # The S3 repository's backup lock is held while objects stream there: no replicate (and
        # no prune) sees the half-copied backup.
        busy = json.loads(dk.run("replicate", "--json").stdout)["repos"][0]["error"]
        assert "another backup is already running" in busy
    finally:
        proc.kill()
        proc.wait()
    left = keys()
    assert left and all(k.startswith(f"backup/{label}/data/") for k in left)
    in_s3 = listed_in(dk, "s3-eu")
    assert in_s3["backups"] == [] and in_s3["incomplete"] == [label]

    # The next backup removes the leftovers from every repository, as from the primary.
    result = dk.run("backup", "--json")
    assert result.exit_code == 0, result.output
    assert f"removed the objects of incomplete backup '{label}'" in result.stderr
    backup = json.loads(result.stdout)
    assert backup["label"] != label  # never reused, even in the same second
    [copy] = backup["copies"]
    assert copy["removed_leftovers"] == [label] and copy["error"] is None
    assert not [k for k in keys() if k.startswith(f"backup/{label}/")]
    assert listed_in(dk, "s3-eu")["incomplete"] == []


def test_failed_backup_takes_back_what_it_streamed(two_repos: Drkit, s3: S3Server) -> None:
    dk, pg = two_repos, two_repos.cluster
    slow_backup(dk)
    keys = s3_keys(s3, dk)
    proc = dk.spawn("backup")
    streamed_while_running(proc, keys, dk)
    pg.stop("immediate")  # PostgreSQL is gone before pg_backup_stop: the backup fails
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 4, stderr
    assert keys() == []  # everything streamed was deleted again
    in_s3 = listed_in(dk, "s3-eu")
    assert in_s3["backups"] == [] and in_s3["incomplete"] == []


def test_s3_down_during_the_backup_then_replicate_completes_the_copy(
    two_repos: Drkit, s3: S3Server
) -> None:
    dk = two_repos
    slow_backup(dk)
    keys = s3_keys(s3, dk)
    proc = dk.spawn("backup", "--json")
    label = streamed_while_running(proc, keys, dk)
    s3.stop()
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 100, stderr  # BackupNotCopied: committed, not copied
    assert f"backup {label} is not yet copied to repository 's3-eu'" in stderr
    [copy] = json.loads(stdout)["copies"]
    assert "unable to reach S3 repository 's3-eu'" in copy["error"]
    assert copy["stream_error"] is not None and copy["copied_backups"] == []
    assert [b["label"] for b in dk.info()["backups"]] == [label]

    s3.start()
    assert listed_in(dk, "s3-eu")["backups"] == []  # only data objects landed: nothing listed
    report = json.loads(dk.ok("replicate", "--json").stdout)["repos"][0]
    assert report["copied_backups"] == [label]
    stored = [p for p in (dk.repo_path / "backup" / label).rglob("*") if p.is_file()]
    assert report["objects"] < len(stored)  # what was streamed before the outage stays
    assert dk.run("verify", "--repo", "s3-eu").exit_code == 0


def _upload_to(
    tmp: Path, key: str, chunks: list[bytes], expected: ObjectEntry
) -> tuple[bool, Path]:
    """Run one streamed copy (drkit/repo/fanout.py) into a posix target, fed from this
    thread the way the backup feeds it; returns what write_to said and the target root."""
    import threading

    from drkit.repo.fanout import _Upload
    from drkit.repo.repository import Repository
    from drkit.storage.posix import PosixStorage

    root = tmp / "target"
    target = Repository(PosixStorage(root, "target"), keys=None)  # type: ignore[arg-type]
    upload = _Upload(key)
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(_try(upload.write_to, target)))
    thread.start()
    for chunk in chunks:
        upload.put(chunk)
    upload.finish(expected)
    thread.join(30)
    [result] = outcome
    if isinstance(result, Exception):
        raise result
    return bool(result), root


def _try(function: Any, *args: Any) -> object:
    try:
        return function(*args)
    except Exception as exc:  # handed back to the test's thread
        return exc


def test_streamed_copy_is_kept_only_with_the_primarys_checksum(tmp_path: Path) -> None:
    chunks = [os.urandom(100_000) for _ in range(5)]
    data = b"".join(chunks)
    good = ObjectEntry(
        key="backup/x/data/0", size=len(data), sha256=hashlib.sha256(data).hexdigest()
    )
    ok, root = _upload_to(tmp_path / "a", good.key, chunks, good)
    assert ok and (root / good.key).read_bytes() == data

    bad = good.model_copy(update={"sha256": hashlib.sha256(b"other").hexdigest()})
    with pytest.raises(IntegrityError, match="differs from the source"):
        _upload_to(tmp_path / "b", good.key, chunks, bad)
    assert not [p for p in (tmp_path / "b").rglob("*") if p.is_file()]


def test_streamed_copy_that_falls_behind_is_dropped_without_a_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from drkit.repo import fanout

    monkeypatch.setattr(fanout, "OBJECT_BUDGET", 150_000)
    chunks = [os.urandom(100_000) for _ in range(5)]
    data = b"".join(chunks)
    entry = ObjectEntry(
        key="backup/x/data/0", size=len(data), sha256=hashlib.sha256(data).hexdigest()
    )
    upload = fanout._Upload(entry.key)
    for chunk in chunks:  # nobody writes yet: the queue passes its budget and the copy is dropped
        upload.put(chunk)
    upload.finish(entry)
    from drkit.repo.repository import Repository
    from drkit.storage.posix import PosixStorage

    target = Repository(PosixStorage(tmp_path / "t", "t"), keys=None)  # type: ignore[arg-type]
    assert upload.write_to(target) is False
    assert not [p for p in (tmp_path / "t").rglob("*") if p.is_file()]
