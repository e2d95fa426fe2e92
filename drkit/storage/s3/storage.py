"""S3Storage: the Storage protocol on an S3 bucket, below an optional key prefix.

Delete
    Deleting in a versioned bucket (Object Lock needs versioning) removes the current version
    itself, not just hides it behind a delete marker, so storage is freed and a version under
    Object Lock retention is refused by the store: that raises ObjectLocked, which prune reports
    and skips. Older, noncurrent versions are left to the bucket's lifecycle rules.
"""

from __future__ import annotations

import functools
import io
from datetime import UTC, datetime
from typing import Any, BinaryIO

from botocore.exceptions import ClientError

from drkit.storage.base import (
    BaseStorage,
    Capabilities,
    ObjectInfo,
    WrittenObject,
    validate_key,
    validate_prefix,
    validate_range,
)
from drkit.storage.s3.bucket import S3Bucket, ceil_second
from drkit.storage.s3.config import S3Config
from drkit.storage.s3.reader import (
    MIN_RANGE,
    _ObjectReader,
    _ParallelSource,
    _Source,
    _StreamSource,
    _Verifier,
    check_range,
    range_size,
)
from drkit.storage.s3.writer import _S3Writer

READ_BUFFER = 256 * 1024


class S3Storage(BaseStorage):
    """Objects below `config.prefix` in `config.bucket`; see the package docstring."""

    def __init__(self, config: S3Config, name: str = "s3", *, client: Any = None) -> None:
        self.config = config
        self.name = name
        self.bucket = S3Bucket(config, name, client)
        self.capabilities = Capabilities(
            conditional_create=True,
            ranged_read=True,
            object_lock=config.object_lock is not None,
            remote=True,
        )

    @property
    def client(self) -> Any:
        """The botocore S3 client; see `S3Bucket.client`."""
        return self.bucket.client

    @property
    def endpoint(self) -> str:
        """The endpoint URL requests go to, for messages."""
        return self.bucket.endpoint

    @property
    def location(self) -> str:
        prefix = f" prefix '{self.config.prefix}'" if self.config.prefix else ""
        return f"bucket '{self.config.bucket}'{prefix} at {self.endpoint}"

    # -- the Storage protocol ---------------------------------------------------------------------

    def open_write(self, key: str, *, retain_until: datetime | None = None) -> _S3Writer:
        """Start writing `key`; see `Storage.open_write`.

        `retain_until` overrides the Object Lock retain-until date for this object (the mode
        stays the configured one); it needs `object_lock` in the configuration.
        """
        s3key = self.bucket.s3key(key)
        if retain_until is not None:
            retain_until = self._check_retain_until(retain_until)
        if self.bucket.head(s3key, "writing", key) is not None:
            raise self.bucket.errors.exists(key)
        return _S3Writer(self.bucket, key, s3key, retain_until)

    def write_bytes(
        self, key: str, data: bytes, *, retain_until: datetime | None = None
    ) -> WrittenObject:
        with self.open_write(key, retain_until=retain_until) as writer:
            writer.write(data)
        return writer.commit()

    def open_read(
        self, key: str, offset: int = 0, length: int | None = None, *, sequential: bool = False
    ) -> BinaryIO:
        s3key = self.bucket.s3key(key)
        validate_range(offset, length)
        if length == 0:
            if self.bucket.head(s3key, "reading", key) is None:
                raise self.bucket.errors.not_found(key)
            return io.BytesIO(b"")
        # The first GET learns the object's size: a read to the end asks for one smallest range,
        # a read of known length for the first of its ranges (reader.range_size), or for all of
        # it if sequential (streamed by that one GET)
        one_get = sequential and length is not None
        if length is None:
            first = min(MIN_RANGE, self.config.part_size)
        elif one_get:
            first = length
        else:
            first = min(range_size(length, self.config), length)
        try:
            resp = self.bucket.get_range(
                key, s3key, offset, offset + first, passthrough=frozenset({"InvalidRange"})
            )
        except ClientError:  # 416: the object exists, the range starts at or past its end
            if offset == 0:
                self._verify_empty(key, s3key)
            return io.BytesIO(b"")
        check_range(resp, key, self.bucket.errors.where(), offset, offset + first)
        total = _total_size(resp)
        end = total if length is None else min(total, offset + length)
        body = resp["Body"]
        etag = resp.get("ETag")
        verifier = None
        if offset == 0 and end == total:
            verifier = _Verifier(self.bucket, key, s3key, etag, resp.get("Metadata") or {}, total)
        first_end = offset + int(resp["ContentLength"])
        source: _Source
        if first_end >= end or self.config.max_concurrency == 1 or one_get:
            source = _StreamSource(self.bucket, key, s3key, etag, offset, end, body, first_end)
        else:
            source = _ParallelSource(self.bucket, key, s3key, etag, offset, first_end, end, body)
        return io.BufferedReader(_ObjectReader(source, verifier), READ_BUFFER)

    def stat(self, key: str) -> ObjectInfo:
        s3key = self.bucket.s3key(key)
        head = self.bucket.head(s3key, "reading", key)
        if head is None:
            raise self.bucket.errors.not_found(key)
        return ObjectInfo(key, int(head["ContentLength"]))

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        validate_prefix(prefix)
        full = self.bucket.base + prefix
        found: list[ObjectInfo] = []
        token: str | None = None
        while True:
            args: dict[str, Any] = {"Bucket": self.config.bucket, "Prefix": full}
            if token:
                args["ContinuationToken"] = token
            list_page = functools.partial(self._list_page, args)
            page = self.bucket.call("listing", prefix or "/", list_page)
            for item in page.get("Contents", ()):
                key = item["Key"][len(self.bucket.base) :]
                if _is_key(key):  # skip foreign objects drkit could not have written
                    found.append(ObjectInfo(key, int(item["Size"])))
            if not page.get("IsTruncated"):
                break
            token = page.get("NextContinuationToken")
            if not token:
                break
        found.sort(key=lambda info: info.key)
        return found

    def delete(self, key: str) -> None:
        self.bucket.delete(key)

    # -- helpers -----------------------------------------------------------------------------------

    def _list_page(self, args: dict[str, Any]) -> Any:
        return self.bucket.client.list_objects_v2(**args)

    def _check_retain_until(self, when: datetime) -> datetime:
        if self.config.object_lock is None:
            raise ValueError(
                f"retain_until needs object_lock in the configuration of repository '{self.name}'"
            )
        if when.tzinfo is None:
            raise ValueError("retain_until must be timezone-aware")
        when = ceil_second(when.astimezone(UTC))
        if when <= datetime.now(UTC):
            raise ValueError(f"retain_until {when.isoformat()} is not in the future")
        return when

    def _verify_empty(self, key: str, s3key: str) -> None:
        """A whole read of an object that answered 416 at offset 0: it must be empty, as written."""
        bucket = self.bucket
        head = bucket.head(s3key, "reading", key)
        if head is None:
            raise bucket.errors.not_found(key)
        verifier = _Verifier(bucket, key, s3key, head.get("ETag"), head.get("Metadata") or {}, 0)
        verifier.finish()


def _total_size(resp: dict[str, Any]) -> int:
    content_range = resp.get("ContentRange") or ""
    _, _, total = content_range.rpartition("/")
    if total.isdigit():
        return int(total)
    return int(resp["ContentLength"])  # a store that ignored the Range header sent it all


def _is_key(key: str) -> bool:
    try:
        validate_key(key)
    except ValueError:
        return False
    return True
