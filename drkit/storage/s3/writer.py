"""Writing one object: a single conditional PUT, or a parallel multipart upload.

Write once
    `open_write` refuses a key that exists (a HEAD), and the commit is a *conditional* write:
    ``If-None-Match: *`` on PutObject and on CompleteMultipartUpload. The store itself refuses to
    replace an existing object, so of two concurrent writers exactly one wins and the other gets
    ObjectExists; there is no window between a check and the write. A store that ignores the
    condition (old MinIO / Ceph releases) would let the last writer win; drkit never writes one
    key from two places, so that loses nothing, but the guarantee is then only the HEAD.
    Every write carries a random ``drkit-write-id``: when a commit's reply is lost and the retry
    is refused with 412, drkit reads the id back and knows the object is its own.

Streaming writes, bounded memory
    Up to `multipart_threshold` bytes are buffered and sent with one PutObject. Beyond that the
    object goes up as a multipart upload of `part_size` parts, uploaded by a small thread pool;
    at most `max_concurrency` parts are in flight, so a writer holds about
    ``(max_concurrency + 1) * part_size`` bytes. Abort (or any failure) aborts the multipart
    upload after waiting for the parts in flight, so nothing becomes visible. A process killed
    mid-upload leaves an incomplete multipart upload: invisible, but billed until a lifecycle
    rule (AbortIncompleteMultipartUpload, see docs/s3.md) removes it.

Object Lock
    With `object_lock` configured, PutObject and CreateMultipartUpload carry ObjectLockMode and
    ObjectLockRetainUntilDate (write time + days, or `open_write(key, retain_until=...)` for one
    object). A multipart object is checked after completion, and a store that ignored the
    retention on CreateMultipartUpload (moto does) gets it with PutObjectRetention; until that
    request returns the object is visible without its lock (a crash leaves it unlocked, never
    missing).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from datetime import datetime
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError, FlexibleChecksumError

from drkit.errors import StorageError
from drkit.storage.base import BaseWriter
from drkit.storage.retry import Attempts
from drkit.storage.s3.checksums import (
    META_PART_SIZE,
    META_SHA256,
    _b64,
    _composite,
    _StoredChecksum,
)
from drkit.storage.s3.config import MAX_PARTS
from drkit.storage.s3.errors import _PRECONDITION_FAILED, _code

if TYPE_CHECKING:
    from drkit.storage.s3.bucket import S3Bucket

log = logging.getLogger(__name__)

_DAMAGED_PUTS = 3  # PutObjects of one body a store keeps damaged before the write fails

META_WRITE_ID = "drkit-write-id"


class _S3Writer(BaseWriter):
    """Buffers one part; a single PUT up to the threshold, else a parallel multipart upload."""

    def __init__(
        self, bucket: S3Bucket, key: str, s3key: str, retain_until: datetime | None
    ) -> None:
        super().__init__(key)
        self._bucket = bucket
        self._s3key = s3key
        self._retain_until = retain_until
        self._write_id = secrets.token_hex(16)
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._futures: list[Future[tuple[dict[str, Any], bytes]]] = []
        self._slots = threading.Semaphore(bucket.config.max_concurrency)
        self._object_args: dict[str, Any] = {}
        self._next_part = 1

    # BaseWriter hooks

    def _write(self, data: bytes | memoryview) -> None:
        cfg = self._bucket.config
        view = memoryview(data).cast("B")
        # Feed at most one part at a time, so a huge write() never buffers more than a part.
        while view:
            room = max(cfg.part_size, cfg.multipart_threshold + 1) - len(self._buffer)
            piece, view = view[: max(room, 1)], view[max(room, 1) :]
            self._buffer += piece
            self._flush_parts()

    def _commit(self) -> None:
        if self._upload_id is None:
            self._put()
        else:
            self._complete()

    def _abort(self) -> None:
        self._stop_parts()
        upload_id, self._upload_id = self._upload_id, None
        self._buffer = bytearray()
        if upload_id is None:
            return
        bucket = self._bucket
        with contextlib.suppress(ClientError):  # NoSuchUpload: already gone
            bucket.call(
                "discarding",
                self.key,
                lambda: bucket.client.abort_multipart_upload(
                    Bucket=bucket.config.bucket, Key=self._s3key, UploadId=upload_id
                ),
                passthrough=frozenset({"NoSuchUpload"}),
            )

    # single PUT

    def _put(self) -> None:
        """One conditional PutObject, checked twice: the store verifies the SHA-256 sent with
        it (AWS and MinIO refuse a body damaged on its way: BadDigest, retried), and drkit
        compares the MD5 the store computed of what it kept (the ETag) with the body's, so a
        store that verifies nothing (moto) cannot keep a damaged body either: it is deleted
        and sent again, a few times, then the write fails. An ETag that differs is confirmed
        by reading the object back: a store whose ETags are no MD5s is then known as one, and
        its objects are not read back again."""
        body, self._buffer = bytes(self._buffer), bytearray()
        digest = self._sha256.digest()
        md5 = hashlib.md5(body, usedforsecurity=False).hexdigest()
        kept: str | None = None
        for _ in range(_DAMAGED_PUTS):
            kept = self._put_once(body, digest)
            if kept is None or kept == md5 or not body or not self._bucket.etags_are_md5:
                return
            if self._reads_back(len(body), digest):
                self._bucket.etags_are_md5 = False
                return
            log.warning(
                "S3 repository '%s': '%s' was damaged on its way (the store computed MD5 %s,"
                " drkit sent %s): sending it again",
                self._bucket.name,
                self.key,
                kept,
                md5,
            )
            self._bucket.delete(self.key)  # StorageError (Object Lock): it stays, and says so
        raise StorageError(
            f"S3 repository '{self._bucket.name}' stored '{self.key}' with MD5 {kept}, but drkit"
            f" sent a body with MD5 {md5}, {_DAMAGED_PUTS} times: the upload was damaged",
            hint="drkit removed the damaged object; check the network path to the store (a"
            " proxy or load balancer that alters bodies), then write it again",
        )

    def _reads_back(self, size: int, digest: bytes) -> bool:
        """Whether the stored object is exactly the body drkit sent (SHA-256 ``digest``)."""
        bucket = self._bucket
        resp = bucket.get_range(self.key, self._s3key, 0, size)
        try:
            body = resp["Body"].read()
        except FlexibleChecksumError:  # botocore's own check of the store's checksum: damaged
            return False
        return hashlib.sha256(body).digest() == digest

    def _put_once(self, body: bytes, digest: bytes) -> str | None:
        """PutObject; the MD5 the store reports for what it stored (None when its ETag is not
        one: SSE-KMS and SSE-C, or an earlier attempt's reply lost)."""
        bucket = self._bucket
        args = bucket.object_args(self._retain_until)
        attempts = Attempts()
        try:
            resp = bucket.call(
                "writing",
                self.key,
                lambda: bucket.client.put_object(
                    Bucket=bucket.config.bucket,
                    Key=self._s3key,
                    Body=body,
                    IfNoneMatch="*",
                    Metadata={META_SHA256: digest.hex(), META_WRITE_ID: self._write_id},
                    ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=_b64(digest),
                    **args,
                ),
                attempts=attempts,
                passthrough=_PRECONDITION_FAILED,
            )
        except ClientError:
            if attempts.count > 1 and self._is_ours():
                return None  # an earlier attempt succeeded; its reply was lost
            raise bucket.errors.exists(self.key) from None
        return _stored_md5(resp)

    # multipart

    def _flush_parts(self) -> None:
        cfg = self._bucket.config
        if self._upload_id is None:
            if len(self._buffer) <= cfg.multipart_threshold:
                return
            self._create_upload()
        while len(self._buffer) >= cfg.part_size:
            with memoryview(self._buffer) as view:
                part = bytes(view[: cfg.part_size])  # one copy, not two
            del self._buffer[: cfg.part_size]
            self._submit(part)

    def _create_upload(self) -> None:
        bucket = self._bucket
        args = self._object_args = bucket.object_args(self._retain_until)
        resp = bucket.call(
            "writing",
            self.key,
            lambda: bucket.client.create_multipart_upload(
                Bucket=bucket.config.bucket,
                Key=self._s3key,
                Metadata={
                    META_PART_SIZE: str(bucket.config.part_size),
                    META_WRITE_ID: self._write_id,
                },
                ChecksumAlgorithm="SHA256",
                **args,
            ),
        )
        self._upload_id = resp["UploadId"]
        self._executor = ThreadPoolExecutor(
            bucket.config.max_concurrency, thread_name_prefix="drkit-s3-put"
        )

    def _submit(self, part: bytes) -> None:
        self._raise_failed()
        number = self._next_part
        if number > MAX_PARTS:
            raise StorageError(
                f"object '{self.key}' is too large for S3 repository '{self._bucket.name}':"
                f" more than {MAX_PARTS} parts of {self._bucket.config.part_size} bytes",
                hint="raise part_size of the repository",
            )
        # At most max_concurrency parts in flight: this bounds the writer's memory.
        self._slots.acquire()
        try:
            self._raise_failed()
            assert self._executor is not None
            future = self._executor.submit(self._upload_part, number, part)
        except BaseException:
            self._slots.release()
            raise
        self._next_part += 1
        future.add_done_callback(lambda _: self._slots.release())
        self._futures.append(future)

    def _upload_part(self, number: int, part: bytes) -> tuple[dict[str, Any], bytes]:
        bucket = self._bucket
        digest = hashlib.sha256(part).digest()
        checksum = _b64(digest)
        upload_id = self._upload_id
        resp = bucket.call(
            "writing",
            self.key,
            lambda: bucket.client.upload_part(
                Bucket=bucket.config.bucket,
                Key=self._s3key,
                UploadId=upload_id,
                PartNumber=number,
                Body=part,
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=checksum,
            ),
        )
        return {"PartNumber": number, "ETag": resp["ETag"], "ChecksumSHA256": checksum}, digest

    def _raise_failed(self) -> None:
        for future in self._futures:
            if future.done() and not future.cancelled():
                error = future.exception()
                if error is not None:
                    raise error

    def _complete(self) -> None:
        bucket = self._bucket
        if self._buffer or self._next_part == 1:
            part, self._buffer = bytes(self._buffer), bytearray()
            self._submit(part)
        results = [future.result() for future in self._futures]
        parts = [entry for entry, _ in results]
        expected = _composite(digest for _, digest in results)
        upload_id = self._upload_id
        attempts = Attempts()
        try:
            resp = bucket.call(
                "committing",
                self.key,
                lambda: bucket.client.complete_multipart_upload(
                    Bucket=bucket.config.bucket,
                    Key=self._s3key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    IfNoneMatch="*",
                ),
                attempts=attempts,
                passthrough=_PRECONDITION_FAILED | {"NoSuchUpload"},
            )
        except ClientError as err:
            if attempts.count > 1 and self._is_ours():
                resp = {}  # an earlier attempt completed it; its reply was lost
            elif _code(err) == "NoSuchUpload":
                raise bucket.errors.failed(err, "committing", self.key) from err
            else:
                raise bucket.errors.exists(self.key) from None
        self._upload_id = None  # completed: nothing left to abort
        self._stop_parts()
        stored = _StoredChecksum(resp.get("ChecksumSHA256"))
        head: dict[str, Any] | None = None
        if not stored.sha256 or "ObjectLockMode" in self._object_args:
            head = bucket.checked_head(self.key, self._s3key, resp.get("ETag"))
            stored = stored if stored.sha256 else _StoredChecksum.from_head(head)
        if head is not None and "ObjectLockMode" in self._object_args:
            self._ensure_retention(head)
        if stored.sha256 is None:
            bucket.warn_unverifiable(self.key)
        elif stored.matches(expected, len(parts)) is False:
            with contextlib.suppress(StorageError):
                bucket.delete(self.key)
            raise StorageError(
                f"S3 repository '{bucket.name}' stored '{self.key}' with checksum"
                f" {stored.sha256}, but drkit sent parts with checksum {expected}-{len(parts)}:"
                " the upload was damaged",
                hint="drkit removed the damaged object (unless Object Lock kept it); write it"
                " again, and check the network path to the store",
            )

    def _ensure_retention(self, head: dict[str, Any]) -> None:
        """Apply the retention to the completed object if the store ignored it on
        CreateMultipartUpload (moto does; AWS does not). Until this call returns, the object is
        visible without its lock: a crash here leaves it unlocked, never missing."""
        if head.get("ObjectLockMode"):
            return
        bucket = self._bucket
        args = bucket.version_args(self._s3key, head)
        retention = {
            "Mode": self._object_args["ObjectLockMode"],
            "RetainUntilDate": self._object_args["ObjectLockRetainUntilDate"],
        }
        log.debug("applying Object Lock retention to '%s' after its multipart upload", self.key)
        bucket.call(
            "locking",
            self.key,
            lambda: bucket.client.put_object_retention(Retention=retention, **args),
        )

    def _stop_parts(self) -> None:
        if self._executor is None:
            return
        for future in self._futures:
            future.cancel()
        wait_futures(self._futures)  # no part may land after the upload is aborted
        self._executor.shutdown(wait=True)
        self._executor = None

    def _is_ours(self) -> bool:
        bucket = self._bucket
        with contextlib.suppress(StorageError):
            head = bucket.head(self._s3key, "committing", self.key)
            return (
                head is not None
                and (head.get("Metadata") or {}).get(META_WRITE_ID) == self._write_id
            )
        return False


def _stored_md5(resp: dict[str, Any]) -> str | None:
    """The MD5 of the stored body a PutObject reply's ETag is, or None when it is not one (with
    SSE-KMS or SSE-C the ETag is no MD5 of the body)."""
    etag = str(resp.get("ETag") or "").strip('"')
    encryption = str(resp.get("ServerSideEncryption") or "")
    if len(etag) != 32 or resp.get("SSECustomerAlgorithm") or encryption.startswith("aws:kms"):
        return None
    if any(c not in "0123456789abcdefABCDEF" for c in etag):
        return None
    return etag.lower()
