"""S3 faults on the wire: an HTTP proxy in front of moto (tests/rig/faultproxy.py) answers 500 and
503 SlowDown, resets connections before and after a request is applied, cuts bodies short,
flips bytes and stalls. Each fault is either retried within the repository's bounds (and the
data is exact) or ends in a clear error with a hint, and a damaged object is never accepted.

``DRKIT_FAULT_TRIALS=N`` runs the end-to-end trial with N seeds (scripts/faults_campaign.sh).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rig.archive import switch_wal
from rig.drkit import Drkit, start_restored, toml_value
from rig.faultproxy import S3FaultProxy
from rig.kill import TRIALS, report
from rig.postgres import PgCluster, chown_to_server_user, database_checksums
from rig.servers import S3Server

from drkit.errors import IntegrityError, StorageError
from drkit.storage.s3 import S3Config, S3Storage

MiB = 1024 * 1024


@pytest.fixture
def bucket(new_bucket: Callable[..., str]) -> str:
    return new_bucket("drkit-faults")


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[S3FaultProxy]:
    with S3FaultProxy(s3_server.direct_endpoint_url) as proxy:
        yield proxy


def storage_behind(proxy: S3FaultProxy, bucket: str, **overrides: Any) -> S3Storage:
    args: dict[str, Any] = {
        "bucket": bucket,
        "endpoint_url": proxy.endpoint_url,
        "region": "us-east-1",
        "max_attempts": 3,
        "retry_base_delay": 0.01,
        "retry_max_delay": 0.05,
        "connect_timeout": 2,
        "read_timeout": 1,
        "part_size": 5 * MiB,
        "multipart_threshold": 5 * MiB,
    }
    args.update(overrides)
    return S3Storage(S3Config(**args), name="offsite")


DATA = os.urandom(200_000)
BIG = os.urandom(12 * MiB)  # three parts of a multipart upload


# (fault, where, plan arguments, what drkit does, what must come out)
RETRIED = [
    ("503", "PutObject", {"method": "PUT", "times": 2}, "write"),
    ("500", "UploadPart", {"method": "PUT", "match": "partNumber=2", "times": 2}, "write-big"),
    ("reset", "PutObject, not applied", {"method": "PUT", "times": 1}, "write"),
    ("reset-after", "PutObject, applied, reply lost", {"method": "PUT", "times": 1}, "write"),
    (
        "reset-after",
        "CompleteMultipartUpload",
        {"method": "POST", "match": "uploadId"},
        "write-big",
    ),
    ("corrupt-request", "PutObject body", {"method": "PUT", "times": 1}, "write"),
    ("corrupt-request", "UploadPart body", {"method": "PUT", "match": "partNumber=3"}, "write-big"),
    ("truncate", "GetObject", {"method": "GET", "times": 2}, "read"),
    ("reset", "GetObject", {"method": "GET", "times": 1}, "read"),
    ("slow", "GetObject past read_timeout", {"method": "GET", "times": 1, "delay": 1.5}, "read"),
    ("503", "ListObjectsV2", {"method": "GET", "match": "list-type", "times": 2}, "list"),
    ("500", "DeleteObject", {"method": "DELETE", "times": 2}, "delete"),
]


@pytest.mark.parametrize(("fault", "where", "plan", "action"), RETRIED, ids=lambda v: str(v))
def test_transient_faults_are_retried_and_the_data_is_exact(
    proxy: S3FaultProxy, bucket: str, fault: str, where: str, plan: dict[str, Any], action: str
) -> None:
    storage = storage_behind(proxy, bucket)
    if action in ("read", "list", "delete"):
        storage.write_bytes("object", DATA)
    planned = proxy.plan(fault, **plan)
    started = time.monotonic()
    if action == "write":
        written = storage.write_bytes("object", DATA)
        assert written.size == len(DATA)
    elif action == "write-big":
        storage.write_bytes("object", BIG)
    elif action == "read":
        assert storage.read_bytes("object") == DATA
    elif action == "list":
        assert [o.key for o in storage.list()] == ["object"]
    elif action == "delete":
        storage.delete("object")
        assert storage.list() == []
    assert time.monotonic() - started < 10  # within the retry budget, not a hang
    assert planned.fired >= 1, f"{fault} at {where} never fired"
    proxy.clear()
    if action.startswith("write"):  # stored exactly: the verifying whole read agrees
        assert storage.read_bytes("object") == (DATA if action == "write" else BIG)
        assert [o.key for o in storage.list()] == ["object"]
    if fault == "corrupt-request":
        assert proxy.bad_digests == 1  # the store refused the damaged body; drkit sent it again


PERSISTENT = [
    ("500", {"method": "GET"}, "read", "kept failing reading 'object'", "try again later"),
    ("503", {"method": "PUT"}, "write", "SlowDown (HTTP 503)", "raise max_attempts"),
    ("truncate", {"method": "GET"}, "read", "connection reset by peer", "reachable"),
    ("slow", {"method": "GET", "delay": 1.5}, "read", "Read timeout", "reachable"),
    ("reset", {"method": "PUT"}, "write", "unable to reach S3 repository 'offsite'", "reachable"),
    (
        "corrupt-request",
        {"method": "PUT"},
        "write",
        "refused the body of 'new' as damaged on its way (BadDigest) every time",
        "nothing damaged was stored",
    ),
]


@pytest.mark.parametrize(("fault", "plan", "action", "message", "hint"), PERSISTENT, ids=str)
def test_persistent_faults_end_in_a_clear_error_and_leave_nothing(
    proxy: S3FaultProxy,
    bucket: str,
    fault: str,
    plan: dict[str, Any],
    action: str,
    message: str,
    hint: str,
) -> None:
    storage = storage_behind(proxy, bucket)
    if action == "read":
        storage.write_bytes("object", DATA)
    proxy.plan(fault, times=None, **plan)
    started = time.monotonic()
    with pytest.raises(StorageError) as failed:
        if action == "read":
            storage.read_bytes("object")
        else:
            storage.write_bytes("new", DATA)
    elapsed = time.monotonic() - started
    assert message in failed.value.message and "after 3 attempts" in failed.value.message
    assert failed.value.hint and hint in failed.value.hint
    assert not isinstance(failed.value, IntegrityError)
    assert elapsed < 3 * 1.5 + 3  # bounded: attempts x timeout, plus backoff
    proxy.clear()
    assert [o.key for o in storage.list()] == (["object"] if action == "read" else [])


def test_a_damaged_body_is_never_accepted(proxy: S3FaultProxy, bucket: str) -> None:
    """A byte flipped in a reply fails the whole-object check (IntegrityError, never retried
    into silence). A store that does not check what it receives (moto; not AWS, not MinIO)
    keeps a body damaged on its way, but reports the MD5 of what it kept (the ETag): the write
    sees the difference, removes the object and sends it again; a body damaged every time
    fails the write, and nothing damaged is left listed."""
    storage = storage_behind(proxy, bucket)
    storage.write_bytes("object", DATA)
    proxy.plan("corrupt", method="GET", times=1)
    with pytest.raises(IntegrityError) as damaged:
        storage.read_bytes("object")
    assert "is damaged: its SHA-256 is" in damaged.value.message
    assert storage.read_bytes("object") == DATA  # the stored object was fine all along

    proxy.validate_checksums = False
    once = proxy.plan("corrupt-request", method="PUT", match="unchecked", times=1)
    storage.write_bytes("unchecked", DATA)
    assert once.fired == 1 and storage.read_bytes("unchecked") == DATA
    proxy.plan("corrupt-request", method="PUT", match="always", times=None)
    with pytest.raises(StorageError, match="3 times: the upload was damaged") as failed:
        storage.write_bytes("always", DATA)
    assert "check the network path" in (failed.value.hint or "")
    assert "always" not in [o.key for o in storage.list()]
    proxy.clear()
    # A multipart upload is checked by drkit itself against the store's composite checksum
    proxy.plan("corrupt-request", method="PUT", match="partNumber=2", times=1)
    with pytest.raises(StorageError, match="the upload was damaged"):
        storage.write_bytes("big", BIG)
    assert "big" not in [o.key for o in storage.list()]


# -- end to end ----------------------------------------------------------------------------------


def behind_proxy(dk: Drkit, proxy: S3FaultProxy, bucket: str) -> None:
    """Point ``dk``'s one repository at an S3 bucket reached through ``proxy``."""
    text = dk.config.read_text()
    repo = {
        "name": "offsite",
        "type": "s3",
        "bucket": bucket,
        "prefix": "prod/main",
        "region": "us-east-1",
        "endpoint_url": proxy.endpoint_url,
        "max_attempts": 6,
        "connect_timeout": 2,
        "read_timeout": 5,
        "multipart_threshold": 5 * MiB,
        "part_size": 5 * MiB,
    }
    lines = ["[[repo]]", *(f"{k} = {toml_value(v)}" for k, v in repo.items())]
    dk.config.write_text(text[: text.index("[[repo]]")] + "\n".join(lines) + "\n")


RANDOM_FAULTS = ("503", "500", "reset", "reset-after", "truncate", "corrupt-request")


@pytest.mark.parametrize("seed", range(TRIALS))
def test_backup_archive_restore_through_a_faulty_network(
    pg: PgCluster, workdir: Path, s3_server: S3Server, bucket: str, seed: int
) -> None:
    """One request in twelve fails in some way: the backup, the WAL archive, verify and the
    restore all complete, and the copy is the source exactly. Then a reply damaged on its way
    makes the restore stop (13), never write wrong bytes, and the next restore is exact."""
    pg.psql("CREATE TABLE t AS SELECT g, md5(g::text) AS v FROM generate_series(1, 200000) g")
    with S3FaultProxy(s3_server.direct_endpoint_url, seed=seed) as proxy:
        dk = Drkit(pg, workdir)
        behind_proxy(dk, proxy, bucket)
        dk.ok("init")
        for fault in RANDOM_FAULTS:
            proxy.plan(fault, times=None, rate=1 / (12 * len(RANDOM_FAULTS)))
        label = json.loads(dk.ok("backup", "--json").stdout)["label"]
        pg.psql("INSERT INTO t SELECT g, 'after' FROM generate_series(1, 1000) g")
        finished = switch_wal(pg)
        source = database_checksums(pg)
        # wal-push as archive_command would call it, for every segment up to the switch
        for segment in sorted((pg.pgdata / "pg_wal").glob("0" * 7 + "*")):
            if len(segment.name) == 24 and segment.name <= finished:
                dk.ok("wal-push", str(segment))
        dk.ok("verify")
        target = workdir / "restored"
        dk.ok("restore", "--pgdata", str(target), "--backup", label, "--target-latest")
        fired = proxy.fired()
        assert sum(fired.values()) >= 3, fired  # the faults were really there
        report(f"s3 seed {seed}", f"{proxy.requests} requests, faults {fired}, restore exact")

        # A damaged reply during a restore: stopped, not accepted
        proxy.clear()
        proxy.plan("corrupt", method="GET", match="/data/", times=None)
        damaged = workdir / "damaged"
        result = dk.run("restore", "--pgdata", str(damaged), "--backup", label)
        assert result.exit_code == IntegrityError.exit_code, result.output
        assert "HINT:" in result.stderr and "Traceback" not in result.output
        proxy.clear()
        # The copy replays the archived WAL through wal-fetch (as the server's user), through
        # the proxy too
        assert dk.keyfile is not None
        chown_to_server_user(dk.keyfile)
        restored = start_restored(target, pg.version, workdir)
        try:
            restored.wait_promoted(timeout=120)
            assert database_checksums(restored) == source
        finally:
            restored.stop()


def test_a_restore_reads_a_large_file_by_a_few_requests(
    pg: PgCluster, workdir: Path, proxy: S3FaultProxy, bucket: str
) -> None:
    """A large file stored in many chunks is restored from S3 by a few long GETs of its object
    (one per worker, plus its header), not one per chunk: S3 charges by the request, and a
    store that reads a whole object for every ranged GET (moto) would read it once per chunk.
    A reply cut short is resumed within the same bound, and the restore is exact."""
    pg.psql("CREATE TABLE t AS SELECT g, md5(g::text) AS v FROM generate_series(1, 150000) g")
    chunk_size = MiB
    size = int(pg.psql("SELECT pg_relation_size('t')").strip())
    assert size >= 8 * chunk_size  # at least eight chunks
    dk = Drkit(pg, workdir, backup={"chunk_size": chunk_size})
    behind_proxy(dk, proxy, bucket)
    dk.ok("init")
    label = json.loads(dk.ok("backup", "--json").stdout)["label"]
    workers = 2  # the rig's process_max, which a restore runs with
    for attempt, fault in enumerate([None, "truncate"]):
        proxy.seen.clear()
        if fault is not None:
            proxy.plan(fault, method="GET", match="/data/", times=1)
        target = workdir / f"restored-{attempt}"
        dk.ok("restore", "--pgdata", str(target), "--backup", label)
        gets = {k: n for k, n in proxy.seen.items() if k.startswith("GET ") and "/data/" in k}
        resumed = sum(proxy.fired().values())
        assert resumed == (fault is not None)
        # The file's object: one GET for its frame's header, one per worker's run of chunks
        assert max(gets.values()) <= workers + 1 + resumed, gets
        relation = pg.psql("SELECT pg_relation_filepath('t')").strip()
        restored = (target / relation).read_bytes()
        assert len(restored) == size
        proxy.clear()
