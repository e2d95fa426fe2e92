"""S3Storage: the conformance suite against moto's S3 server over HTTP, plus what only S3 has
(multipart, checksums kept by drkit, retries, outages, storage class, SSE, Object Lock, prefixes).

Every test gets a fresh bucket on the session's server; tests that stop the server use ``s3``.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ConnectionClosedError
from rig.faultproxy import S3FaultProxy
from rig.servers import S3Server

from drkit.config.settings import S3Repo, load_settings
from drkit.errors import ConfigError, IntegrityError, ObjectExists, StorageError
from drkit.repo.open import open_storage, repo_location
from drkit.storage.base import WrittenObject
from drkit.storage.retry import RetryPolicy
from drkit.storage.s3 import (
    META_PART_SIZE,
    META_SHA256,
    ObjectLock,
    ObjectLocked,
    S3Config,
    S3Storage,
    _StoredChecksum,
    _Verifier,
    composite_checksum,
)

from .conformance import ODD_CHUNKS, StorageConformance, payload, sha256

MiB = 1024 * 1024
PART = 5 * MiB  # S3's smallest part: the multipart path at test sizes


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, s3_server: S3Server) -> None:
    """Credentials from the environment, as in production (the AWS chain); never ~/.aws."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)


def _new_bucket(server: S3Server, *, lock: bool = False) -> str:
    name = f"drkit-test-{uuid.uuid4().hex[:16]}"
    args: dict[str, Any] = {"ObjectLockEnabledForBucket": True} if lock else {}
    server.client().create_bucket(Bucket=name, **args)
    return name


def _drop_bucket(server: S3Server, name: str) -> None:
    """Best effort: empty and delete the bucket (moto keeps everything in memory)."""
    client = server.client()
    try:
        for page in client.get_paginator("list_object_versions").paginate(Bucket=name):
            for item in page.get("Versions", []) + page.get("DeleteMarkers", []):
                # COMPLIANCE-locked versions stay until the server goes.
                with contextlib.suppress(Exception):
                    client.delete_object(
                        Bucket=name,
                        Key=item["Key"],
                        VersionId=item["VersionId"],
                        BypassGovernanceRetention=True,
                    )
        for upload in client.list_multipart_uploads(Bucket=name).get("Uploads", []):
            client.abort_multipart_upload(
                Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"]
            )
        client.delete_bucket(Bucket=name)
    except Exception:
        pass


@pytest.fixture
def bucket(s3_server: S3Server, aws_env: None) -> Iterator[str]:
    name = _new_bucket(s3_server)
    yield name
    _drop_bucket(s3_server, name)


@pytest.fixture
def lock_bucket(s3_server: S3Server, aws_env: None) -> Iterator[str]:
    name = _new_bucket(s3_server, lock=True)
    yield name
    _drop_bucket(s3_server, name)


def make_storage(server: S3Server, bucket: str, **overrides: Any) -> S3Storage:
    """An S3Storage on the test server with a small, fast retry budget."""
    args: dict[str, Any] = {
        "bucket": bucket,
        "endpoint_url": server.endpoint_url,
        "region": server.region,
        "max_attempts": 3,
        "retry_base_delay": 0.01,
        "retry_max_delay": 0.05,
        "connect_timeout": 5,
        "read_timeout": 20,
    }
    args.update(overrides)
    return S3Storage(S3Config(**args), name="test-s3")


class CallTracker:
    """Counts botocore operations on a storage's client and the most that ran at once."""

    def __init__(self, storage: S3Storage, operation: str, delay: float = 0.0) -> None:
        self.calls = 0
        self.sends = 0
        self.inflight = 0
        self.max_inflight = 0
        self.threads: set[str] = set()
        self._delay = delay
        self._lock = threading.Lock()
        events = storage.client.meta.events
        events.register(f"before-call.s3.{operation}", self._before)
        events.register(f"after-call.s3.{operation}", self._after)
        events.register(f"after-call-error.s3.{operation}", self._after)
        events.register(f"before-send.s3.{operation}", self._send)

    def _before(self, **_: Any) -> None:
        with self._lock:
            self.calls += 1
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            self.threads.add(threading.current_thread().name)
        if self._delay:
            time.sleep(self._delay)

    def _after(self, **_: Any) -> None:
        with self._lock:
            self.inflight -= 1

    def _send(self, **_: Any) -> None:
        with self._lock:
            self.sends += 1


class _RawBody:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._body


def fail_first(
    storage: S3Storage, operation: str, times: int, status: int, code: str
) -> Callable[[], int]:
    """Answer the first `times` sends of `operation` with an S3 error reply; return a counter."""
    sent = [0]

    def reply(request: Any, **_: Any) -> AWSResponse | None:
        sent[0] += 1
        if sent[0] > times:
            return None
        body = f"<Error><Code>{code}</Code><Message>injected {code}</Message></Error>"
        return AWSResponse(request.url, status, {}, _RawBody(body.encode()))

    storage.client.meta.events.register(f"before-send.s3.{operation}", reply)
    return lambda: sent[0]


# -- the conformance suite ------------------------------------------------------------------------


class TestS3Conformance(StorageConformance):
    @pytest.fixture(
        params=[
            pytest.param(
                {
                    "prefix": "repos/main",
                    "part_size": PART,
                    "multipart_threshold": PART,
                    "max_concurrency": 3,
                },
                id="prefix-5mib-parts",
            ),
            pytest.param({}, id="root-defaults"),
        ]
    )
    def storage(
        self, request: pytest.FixtureRequest, s3_server: S3Server, bucket: str
    ) -> S3Storage:
        return make_storage(s3_server, bucket, **request.param)


# -- multipart ------------------------------------------------------------------------------------


def test_multipart_upload_uses_parallel_parts(s3_server: S3Server, bucket: str) -> None:
    storage = make_storage(
        s3_server, bucket, part_size=PART, multipart_threshold=PART, max_concurrency=2
    )
    parts = CallTracker(storage, "UploadPart", delay=0.3)  # slow parts: they must overlap
    puts = CallTracker(storage, "PutObject")
    data = payload(17 * MiB, seed=17)
    with storage.open_write("big/object") as writer:
        position = 0
        chunks = iter(ODD_CHUNKS * 100)
        while position < len(data):
            size = next(chunks)
            writer.write(data[position : position + size])
            position += size
    assert writer.commit() == WrittenObject("big/object", len(data), sha256(data))

    assert parts.calls == 4  # 5 + 5 + 5 + 2 MiB
    assert puts.calls == 0
    assert parts.max_inflight == 2  # parallel, and never more than max_concurrency in memory
    assert len(parts.threads) == 2

    head = s3_server.client().head_object(Bucket=bucket, Key="big/object", ChecksumMode="ENABLED")
    assert head["ContentLength"] == len(data)
    assert head["Metadata"][META_PART_SIZE] == str(PART)
    assert META_SHA256 not in head["Metadata"]
    value, _, _ = composite_checksum(data, PART).partition("-")
    assert head["ChecksumSHA256"].partition("-")[0] == value

    # A whole read fetches ranged chunks in parallel and checks the composite checksum.
    gets = CallTracker(storage, "GetObject", delay=0.1)
    assert storage.read_bytes("big/object") == data
    assert gets.calls == 4
    assert gets.max_inflight == 2
    assert storage.read_bytes("big/object", 3 * MiB, 9 * MiB) == data[3 * MiB : 12 * MiB]


def test_single_put_below_the_threshold(s3_server: S3Server, bucket: str) -> None:
    storage = make_storage(s3_server, bucket, part_size=PART, multipart_threshold=12 * MiB)
    puts = CallTracker(storage, "PutObject")
    parts = CallTracker(storage, "UploadPart")
    data = payload(12 * MiB, seed=12)
    written = storage.write_bytes("exactly-threshold", data)
    assert written.sha256 == sha256(data)
    assert (puts.calls, parts.calls) == (1, 0)
    head = s3_server.client().head_object(Bucket=bucket, Key="exactly-threshold")
    assert head["Metadata"][META_SHA256] == sha256(data)
    # Read back in 5 MiB chunks in parallel, verified against the metadata digest.
    assert storage.read_bytes("exactly-threshold") == data


# -- ranged reads ---------------------------------------------------------------------------------


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[S3FaultProxy]:
    with S3FaultProxy(s3_server.direct_endpoint_url) as fault_proxy:
        yield fault_proxy


def test_a_large_read_is_spread_over_parallel_ranges_sized_to_it(
    s3_server: S3Server, bucket: str
) -> None:
    storage = make_storage(s3_server, bucket)  # 16 MiB parts, 4 GETs at once
    data = payload(40 * MiB, seed=41)
    storage.write_bytes("large", data)
    gets = CallTracker(storage, "GetObject", delay=0.05)
    with storage.open_read("large") as stream:
        first = stream.read(MiB)  # handed out while the next ranges download
        assert 1 <= gets.calls < 5
        assert first + stream.read() == data
    # One 8 MiB GET learns the size, then 10 MiB ranges (40 MiB over 4 GETs), 4 at most at once.
    assert gets.calls == 5
    assert 2 <= gets.max_inflight <= 4
    gets.calls = 0
    assert storage.read_bytes("large", 3 * MiB, 24 * MiB) == data[3 * MiB : 27 * MiB]
    assert gets.calls == 3  # three 8 MiB ranges
    # A sequential read (its caller reads other ranges in parallel) is streamed by one GET
    gets.calls = 0
    with storage.open_read("large", 3 * MiB, 24 * MiB, sequential=True) as stream:
        assert stream.read() == data[3 * MiB : 27 * MiB]
    assert gets.calls == 1


def test_one_get_at_a_time_reads_a_large_object_without_a_retry(
    s3_server: S3Server, bucket: str
) -> None:
    # max_concurrency = 1: the rest after the first 8 MiB GET comes by a second GET, which is
    # no failure (with a single attempt allowed, the read still succeeds)
    storage = make_storage(s3_server, bucket, max_concurrency=1, max_attempts=1)
    data = payload(12 * MiB, seed=12)
    storage.write_bytes("serial", data)
    gets = CallTracker(storage, "GetObject")
    assert storage.read_bytes("serial") == data
    assert gets.calls == 2


def test_a_short_ranged_reply_is_resumed_never_taken_whole(
    proxy: S3FaultProxy, s3_server: S3Server, bucket: str
) -> None:
    storage = make_storage(
        s3_server, bucket, endpoint_url=proxy.endpoint_url, part_size=PART, max_attempts=3
    )
    data = payload(20 * MiB, seed=20)
    storage.write_bytes("cut", data)
    proxy.plan("short", method="GET", times=4)  # half of each of four replies comes
    assert storage.read_bytes("cut") == data
    assert storage.read_bytes("cut", 7 * MiB, 9 * MiB) == data[7 * MiB : 16 * MiB]
    proxy.plan("short", method="GET", times=1)  # the one GET of a sequential read
    with storage.open_read("cut", 7 * MiB, 9 * MiB, sequential=True) as stream:
        assert stream.read() == data[7 * MiB : 16 * MiB]
    proxy.assert_all_fired()


def test_a_reply_holding_other_bytes_than_asked_is_an_error(
    proxy: S3FaultProxy, s3_server: S3Server, bucket: str
) -> None:
    storage = make_storage(s3_server, bucket, endpoint_url=proxy.endpoint_url, part_size=PART)
    data = payload(12 * MiB, seed=12)
    storage.write_bytes("ranged", data)
    proxy.plan("ignore-range", method="GET", times=None)  # the whole object, whatever is asked
    with pytest.raises(StorageError, match=r"answered bytes 0-12582911 .* bytes 3145728-") as info:
        storage.read_bytes("ranged", 3 * MiB, MiB)
    assert "mishandles ranged reads" in (info.value.hint or "")
    # From byte 0 the whole object is what a store without ranged reads sends: still correct.
    assert storage.read_bytes("ranged") == data


def test_a_range_damaged_in_transit_fails_the_read(
    proxy: S3FaultProxy, s3_server: S3Server, bucket: str
) -> None:
    storage = make_storage(s3_server, bucket, endpoint_url=proxy.endpoint_url, part_size=PART)
    data = payload(17 * MiB, seed=17)
    storage.write_bytes("flipped", data)
    proxy.plan("corrupt", method="GET", times=1)
    with pytest.raises(IntegrityError, match=r"'flipped' .* is damaged"):
        storage.read_bytes("flipped")
    proxy.assert_all_fired()
    assert storage.read_bytes("flipped") == data  # the stored object was intact


@pytest.mark.parametrize("how", ["abort", "exception"])
def test_abort_of_a_multipart_write_leaves_nothing(
    s3_server: S3Server, bucket: str, how: str
) -> None:
    storage = make_storage(s3_server, bucket, part_size=PART, multipart_threshold=PART)
    parts = CallTracker(storage, "UploadPart")
    client = s3_server.client()
    writer = storage.open_write("aborted/object")
    writer.write(payload(12 * MiB))
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads")  # it did start
    if how == "abort":
        writer.abort()
    else:
        with pytest.raises(RuntimeError), writer:
            raise RuntimeError("producer failed")
    assert parts.calls == 2
    assert storage.list() == []
    assert not storage.exists("aborted/object")
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    storage.write_bytes("aborted/object", b"the key is still free")


def test_multipart_commit_is_conditional(s3_server: S3Server, bucket: str) -> None:
    storage = make_storage(s3_server, bucket, part_size=PART, multipart_threshold=PART)
    first = storage.open_write("race")
    second = storage.open_write("race")
    first.write(payload(6 * MiB, seed=1))
    second.write(payload(7 * MiB, seed=2))
    second.commit()
    with pytest.raises(ObjectExists):
        first.commit()
    assert storage.read_bytes("race") == payload(7 * MiB, seed=2)
    assert s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


# -- checksums drkit keeps itself -----------------------------------------------------------------


def _overwrite(server: S3Server, bucket: str, key: str, data: bytes, keep_metadata: bool) -> None:
    """Replace an object behind drkit's back, as damage or tampering would."""
    client = server.client()
    metadata = client.head_object(Bucket=bucket, Key=key)["Metadata"] if keep_metadata else {}
    client.put_object(Bucket=bucket, Key=key, Body=data, Metadata=metadata)


@pytest.mark.parametrize("size", [100_000, 11 * MiB])  # one GET; parallel 5 MiB chunks
def test_corrupted_object_fails_a_whole_read(s3_server: S3Server, bucket: str, size: int) -> None:
    storage = make_storage(s3_server, bucket, part_size=PART, multipart_threshold=12 * MiB)
    data = payload(size, seed=size)
    storage.write_bytes("damaged", data)
    damaged = bytearray(data)
    damaged[size // 2] ^= 0x01
    _overwrite(s3_server, bucket, "damaged", bytes(damaged), keep_metadata=True)

    with pytest.raises(IntegrityError, match=r"damaged.*SHA-256"):
        storage.read_bytes("damaged")
    # Streaming: the error comes before the last bytes are handed out.
    received = 0
    with pytest.raises(IntegrityError), storage.open_read("damaged") as stream:
        while chunk := stream.read(65_537):
            received += len(chunk)
    assert received < size
    # A range cannot be checked whole here (the frame AEAD covers ranges).
    assert storage.read_bytes("damaged", 10, 100) == bytes(damaged[10:110])


def test_object_without_drkit_checksum_fails(s3_server: S3Server, bucket: str) -> None:
    storage = make_storage(s3_server, bucket)
    storage.write_bytes("replaced", b"original")
    _overwrite(s3_server, bucket, "replaced", b"original", keep_metadata=False)
    with pytest.raises(IntegrityError, match="not written by drkit"):
        storage.read_bytes("replaced")


def test_truncated_to_empty_fails(s3_server: S3Server, bucket: str) -> None:
    storage = make_storage(s3_server, bucket)
    storage.write_bytes("truncated", b"something")
    _overwrite(s3_server, bucket, "truncated", b"", keep_metadata=True)
    with pytest.raises(IntegrityError):
        storage.read_bytes("truncated")
    storage.write_bytes("empty", b"")
    assert storage.read_bytes("empty") == b""


def test_multipart_object_replaced_by_single_put_fails(s3_server: S3Server, bucket: str) -> None:
    storage = make_storage(s3_server, bucket, part_size=PART, multipart_threshold=PART)
    data = payload(6 * MiB, seed=6)
    storage.write_bytes("mp", data)
    _overwrite(s3_server, bucket, "mp", data[:-1] + b"\0", keep_metadata=True)
    with pytest.raises(IntegrityError, match="no SHA-256"):
        storage.read_bytes("mp")


def test_composite_verifier(s3_server: S3Server, bucket: str) -> None:
    """The composite check itself (moto recomputes checksums from what it stores, so a store
    that kept a stale checksum for changed bytes cannot be staged over HTTP)."""
    storage = make_storage(s3_server, bucket)
    data = payload(2 * PART + 123, seed=9)
    meta = {META_PART_SIZE: str(PART)}

    def check(stored: _StoredChecksum, blob: bytes) -> None:
        verifier = _Verifier(storage.bucket, "k", "k", None, meta, len(blob), lambda: stored)
        for i in range(0, len(blob), 777_777):
            verifier.update(memoryview(blob)[i : i + 777_777])
        verifier.finish()

    good = composite_checksum(data, PART)
    check(_StoredChecksum(good), data)
    check(_StoredChecksum(good.partition("-")[0]), data)  # HEAD without the "-3" suffix
    with pytest.raises(IntegrityError, match="composite"):
        check(_StoredChecksum(good), data[:-1] + b"x")
    check(_StoredChecksum(composite_checksum(data, 8 * MiB)), data)  # other layout: unverifiable
    check(_StoredChecksum(None), data)  # a store without checksums: unverifiable, a warning
    with pytest.raises(IntegrityError):
        check(_StoredChecksum(None, others=True), data)


# -- retries and outages --------------------------------------------------------------------------


def test_throttling_is_retried(s3_server: S3Server, bucket: str) -> None:
    storage = make_storage(s3_server, bucket, max_attempts=4)
    sent = fail_first(storage, "PutObject", times=2, status=503, code="SlowDown")
    storage.write_bytes("throttled", b"eventually")
    assert sent() == 3
    assert storage.read_bytes("throttled") == b"eventually"

    sent = fail_first(storage, "HeadObject", times=10, status=500, code="InternalError")
    with pytest.raises(StorageError, match="kept failing") as info:
        storage.stat("throttled")
    assert sent() == 4
    assert "after 4 attempts" in str(info.value)


def test_lost_reply_of_a_commit_is_recognised(s3_server: S3Server, bucket: str) -> None:
    """The PUT landed but its reply was lost: the retry gets 412, and drkit knows it was its own
    write by the write id, instead of reporting ObjectExists for its own object."""
    storage = make_storage(s3_server, bucket)
    calls = [0]

    def lose_reply(**_: Any) -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise ConnectionClosedError(endpoint_url=s3_server.endpoint_url)

    storage.client.meta.events.register("after-call.s3.PutObject", lose_reply)
    written = storage.write_bytes("lost-reply", b"mine")
    assert written.sha256 == sha256(b"mine")
    assert calls[0] == 2
    # Someone else's object is still refused.
    other = storage.open_write("other")
    s3_server.client().put_object(Bucket=bucket, Key="other", Body=b"theirs")
    other.write(b"mine")
    with pytest.raises(ObjectExists):
        other.commit()


def test_server_down_then_back(s3: S3Server, aws_env: None) -> None:
    bucket = _new_bucket(s3)
    storage = make_storage(s3, bucket, part_size=PART, multipart_threshold=PART)
    storage.write_bytes("before", b"written before the outage")
    sends = CallTracker(storage, "PutObject")
    s3.stop()

    with pytest.raises(StorageError) as info:
        storage.write_bytes("during", b"x")
    message = str(info.value)
    assert f"unable to reach S3 repository 'test-s3' at {s3.endpoint_url}" in message
    assert f"bucket '{bucket}'" in message and "'during'" in message
    assert "3 attempts" in message
    assert info.value.hint and "reachable" in info.value.hint
    assert sends.sends == 0  # refused at the HEAD of open_write, before any PUT
    for action in (
        lambda: storage.read_bytes("before"),
        lambda: storage.list(),
        lambda: storage.delete("before"),
        lambda: storage.stat("before"),
    ):
        with pytest.raises(StorageError, match="unable to reach S3 repository 'test-s3'"):
            action()

    s3.start()
    assert storage.read_bytes("before") == b"written before the outage"
    storage.write_bytes("after", b"works again")
    assert [info.key for info in storage.list()] == ["after", "before"]


def test_outage_during_a_multipart_write_leaves_nothing(s3: S3Server, aws_env: None) -> None:
    bucket = _new_bucket(s3)
    storage = make_storage(s3, bucket, part_size=PART, multipart_threshold=PART)
    writer = storage.open_write("interrupted")
    writer.write(payload(6 * MiB))  # the upload starts, one part goes up
    s3.stop()
    with pytest.raises(StorageError, match="unable to reach"):
        writer.write(payload(5 * MiB))
        writer.commit()
    s3.start()
    assert storage.list() == []
    # The abort could not reach the server; the upload is left to the lifecycle rule.
    storage.write_bytes("interrupted", b"retry after the outage")


def test_read_resumes_after_a_connection_reset(s3: S3Server, aws_env: None) -> None:
    bucket = _new_bucket(s3)
    storage = make_storage(
        s3,
        bucket,
        part_size=64 * MiB,
        multipart_threshold=64 * MiB,
        max_concurrency=1,
        max_attempts=5,
        retry_base_delay=0.05,
    )
    data = payload(40 * MiB, seed=40)
    storage.write_bytes("long", data)
    gets = CallTracker(storage, "GetObject")
    with storage.open_read("long") as stream:
        head = stream.read(MiB)
        s3.stop()  # resets the open connection
        s3.start()
        rest = stream.read()
    assert head + rest == data
    assert gets.calls >= 2  # the first GET broke; a ranged GET resumed it


def test_missing_bucket(s3_server: S3Server, aws_env: None) -> None:
    storage = make_storage(s3_server, f"drkit-missing-{uuid.uuid4().hex[:12]}")
    for action in (lambda: storage.write_bytes("x", b"1"), storage.list):
        with pytest.raises(StorageError, match="does not exist") as info:
            action()
        assert info.value.hint and "create" in info.value.hint


def test_access_denied_has_a_hint(s3_server: S3Server, bucket: str) -> None:
    storage = make_storage(s3_server, bucket)
    fail_first(storage, "ListObjectsV2", times=1, status=403, code="AccessDenied")
    with pytest.raises(StorageError, match="access denied listing") as info:
        storage.list()
    assert info.value.hint and "IAM policy" in info.value.hint


def test_no_credentials(s3_server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage = make_storage(s3_server, bucket)
    with pytest.raises(StorageError, match="no usable AWS credentials") as info:
        storage.list()
    assert info.value.hint and "AWS_ACCESS_KEY_ID" in info.value.hint


# -- storage class, encryption, Object Lock --------------------------------------------------------


@pytest.mark.parametrize("size", [1000, 6 * MiB])  # PutObject; CreateMultipartUpload
def test_storage_class_and_sse_are_sent(s3_server: S3Server, bucket: str, size: int) -> None:
    key_id = "arn:aws:kms:us-east-1:123456789012:key/drkit-test"
    storage = make_storage(
        s3_server,
        bucket,
        part_size=PART,
        multipart_threshold=PART,
        storage_class="STANDARD_IA",
        sse="aws:kms",
        sse_kms_key_id=key_id,
    )
    storage.write_bytes("classy", payload(size))
    head = s3_server.client().head_object(Bucket=bucket, Key="classy")
    assert head["StorageClass"] == "STANDARD_IA"
    assert head["ServerSideEncryption"] == "aws:kms"
    assert head["SSEKMSKeyId"] == key_id

    aes = make_storage(s3_server, bucket, prefix="aes", sse="AES256")
    aes.write_bytes("x", b"x")
    head = s3_server.client().head_object(Bucket=bucket, Key="aes/x")
    assert head["ServerSideEncryption"] == "AES256"


@pytest.mark.parametrize("size", [1000, 6 * MiB])
def test_object_lock_retention_from_config(
    s3_server: S3Server, lock_bucket: str, size: int
) -> None:
    storage = make_storage(
        s3_server,
        lock_bucket,
        part_size=PART,
        multipart_threshold=PART,
        object_lock=ObjectLock("GOVERNANCE", 7),
    )
    before = datetime.now(UTC)
    storage.write_bytes("locked", payload(size))
    head = s3_server.client().head_object(Bucket=lock_bucket, Key="locked")
    assert head["ObjectLockMode"] == "GOVERNANCE"
    until = head["ObjectLockRetainUntilDate"]
    expected = before + timedelta(days=7)
    assert expected - timedelta(seconds=2) <= until <= expected + timedelta(minutes=1)

    with pytest.raises(ObjectLocked, match="protected by Object Lock \\(GOVERNANCE\\)") as info:
        storage.delete("locked")
    assert info.value.until == until
    assert info.value.hint and "prune" in info.value.hint
    assert storage.exists("locked")  # no delete marker hid it either
    assert storage.read_bytes("locked") == payload(size)


def test_object_lock_compliance_until_an_explicit_date(
    s3_server: S3Server, lock_bucket: str
) -> None:
    storage = make_storage(s3_server, lock_bucket, object_lock=ObjectLock("COMPLIANCE", 1))
    until = datetime.now(UTC) + timedelta(seconds=3)
    storage.write_bytes("short", b"kept for a moment", retain_until=until)
    head = s3_server.client().head_object(Bucket=lock_bucket, Key="short")
    assert head["ObjectLockMode"] == "COMPLIANCE"
    assert abs(head["ObjectLockRetainUntilDate"] - until) < timedelta(seconds=2)
    with pytest.raises(ObjectLocked, match="COMPLIANCE"):
        storage.delete("short")
    # Once retention has passed, delete removes the version itself (nothing left behind).
    time.sleep(max(0.0, (head["ObjectLockRetainUntilDate"] - datetime.now(UTC)).total_seconds()))
    time.sleep(1.1)
    storage.delete("short")
    assert storage.list() == []
    versions = s3_server.client().list_object_versions(Bucket=lock_bucket)
    assert versions.get("Versions", []) == [] and versions.get("DeleteMarkers", []) == []


def test_retain_until_needs_object_lock(s3_server: S3Server, bucket: str) -> None:
    storage = make_storage(s3_server, bucket)
    assert not storage.capabilities.object_lock
    with pytest.raises(ValueError, match="object_lock"):
        storage.open_write("x", retain_until=datetime.now(UTC) + timedelta(days=1))
    locked = make_storage(s3_server, bucket, object_lock=ObjectLock("GOVERNANCE", 1))
    with pytest.raises(ValueError, match="timezone"):
        locked.open_write("x", retain_until=datetime.now() + timedelta(days=1))
    with pytest.raises(ValueError, match="future"):
        locked.open_write("x", retain_until=datetime.now(UTC) - timedelta(seconds=1))


def test_object_lock_on_a_bucket_without_it(s3_server: S3Server, bucket: str) -> None:
    storage = make_storage(s3_server, bucket, object_lock=ObjectLock("GOVERNANCE", 1))
    with pytest.raises(StorageError) as info:
        storage.write_bytes("x", b"x")
    assert info.value.hint and "Object Lock enabled" in info.value.hint
    assert storage.list() == []


# -- prefixes -------------------------------------------------------------------------------------


def test_prefix_isolation(s3_server: S3Server, bucket: str) -> None:
    one = make_storage(s3_server, bucket, prefix="team/one")
    other = make_storage(s3_server, bucket, prefix="/team/one-other/")  # slashes are trimmed
    root = make_storage(s3_server, bucket)
    one.write_bytes("backup/manifest", b"one")
    other.write_bytes("backup/manifest", b"other")
    other.write_bytes("only-other", b"x")

    assert [i.key for i in one.list()] == ["backup/manifest"]
    assert [i.key for i in other.list()] == ["backup/manifest", "only-other"]
    assert one.read_bytes("backup/manifest") == b"one"
    assert not one.exists("only-other")
    one.delete("only-other")  # not there: a no-op, the other prefix keeps it
    assert other.exists("only-other")
    assert [i.key for i in root.list("team/")] == [
        "team/one-other/backup/manifest",
        "team/one-other/only-other",
        "team/one/backup/manifest",
    ]
    with pytest.raises(ObjectExists):
        root.open_write("team/one/backup/manifest")


def test_foreign_objects_with_odd_names_are_not_listed(s3_server: S3Server, bucket: str) -> None:
    storage = make_storage(s3_server, bucket, prefix="p")
    client = s3_server.client()
    for key in ("p/", "p/dir/", "p/a//b", "p/./x"):
        client.put_object(Bucket=bucket, Key=key, Body=b"")
    storage.write_bytes("ok", b"1")
    assert [i.key for i in storage.list()] == ["ok"]


def test_key_too_long_below_the_prefix(s3_server: S3Server, bucket: str) -> None:
    storage = make_storage(s3_server, bucket, prefix="p" * 200)
    key = "/".join(["k" * 200] * 5)  # 1004 bytes: a valid key, but not below a 201-byte prefix
    with pytest.raises(ValueError, match="too long"):
        storage.open_write(key)


# -- configuration --------------------------------------------------------------------------------


CONFIG = """
[postgres]
pgdata = "/tmp/pgdata"
[keys]
keyfile = "/tmp/key"
[[repo]]
name = "local"
path = "/var/lib/drkit/repo"
[[repo]]
name = "s3-eu"
type = "s3"
bucket = "acme-pg-backups"
prefix = "prod/main"
region = "eu-west-1"
endpoint_url = "https://minio.internal:9000"
storage_class = "STANDARD_IA"
sse = "aws:kms"
object_lock = { mode = "COMPLIANCE", days = 35 }
offsite = true
"""


def test_settings_build_an_s3_storage(tmp_path: Path) -> None:
    path = tmp_path / "drkit.toml"
    path.write_text(CONFIG)
    settings = load_settings(path)
    local, remote = settings.repo
    assert (local.type, local.media, local.offsite) == ("posix", "disk", False)
    assert isinstance(remote, S3Repo)
    assert (remote.type, remote.media, remote.offsite) == ("s3", "object-storage", True)
    storage = open_storage(remote)
    assert isinstance(storage, S3Storage)
    assert storage.name == "s3-eu"
    assert storage.config.object_lock == ObjectLock("COMPLIANCE", 35)
    assert storage.capabilities.object_lock
    assert storage.config.path_style  # default with a custom endpoint
    assert storage.config.part_size == 16 * MiB
    assert repo_location(remote) == "s3:https://minio.internal:9000/acme-pg-backups/prod/main"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('aws_secret_access_key = "x"', "never reads S3 credentials"),
        ('sse_kms_key_id = "k"\nsse = "AES256"', "sse_kms_key_id needs"),
        ('storage_class = "DEEP_ARCHIVE"', "restore request"),
        ("part_size = 1024", "part_size"),
    ],
)
def test_settings_refuse(tmp_path: Path, extra: str, message: str) -> None:
    path = tmp_path / "drkit.toml"
    config = CONFIG.replace('sse = "aws:kms"\n', "").replace('storage_class = "STANDARD_IA"\n', "")
    path.write_text(config + extra + "\n")
    with pytest.raises(ConfigError, match=message):
        load_settings(path)


def test_retry_policy_backoff() -> None:
    policy = RetryPolicy(max_attempts=6, base_delay=0.1, max_delay=1.0)
    for attempt in range(1, 10):
        ceiling = min(1.0, 0.1 * 2 ** (attempt - 1))
        assert all(0 <= policy.delay(attempt) <= ceiling for _ in range(50))
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_nothing_is_sent_on_construction() -> None:
    storage = S3Storage(S3Config(bucket="never-contacted", endpoint_url="http://127.0.0.1:9"))
    assert not storage.bucket.connected
