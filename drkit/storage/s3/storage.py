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
import logging
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO, TypeVar

import botocore.loaders
import botocore.session
import urllib3.exceptions
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ProfileNotFound

from drkit import __version__
from drkit.errors import ConfigError, ObjectNotFound
from drkit.storage.base import (
    MAX_KEY_BYTES,
    BaseStorage,
    ObjectInfo,
    WrittenObject,
    validate_key,
    validate_prefix,
    validate_range,
)
from drkit.storage.retry import Attempts, RetryPolicy, retry_call
from drkit.storage.s3.checksums import _StoredChecksum
from drkit.storage.s3.config import S3Config
from drkit.storage.s3.errors import (
    _ACCESS_DENIED,
    _PRECONDITION_FAILED,
    S3Errors,
    _code,
    is_transient,
)
from drkit.storage.s3.reader import (
    _ObjectReader,
    _ParallelSource,
    _Source,
    _StreamSource,
    _Verifier,
)
from drkit.storage.s3.writer import _S3Writer

T = TypeVar("T")

log = logging.getLogger(__name__)

READ_BUFFER = 256 * 1024


_CLIENTS_LOCK = threading.Lock()  # botocore: making clients is not thread-safe
_CLIENTS: dict[str, Any] = {}
_LOADER: Any = None


def _loader() -> Any:
    global _LOADER
    if _LOADER is None:
        _LOADER = botocore.loaders.create_loader()
    return _LOADER


class S3Storage(BaseStorage):
    """Objects below `config.prefix` in `config.bucket`; see the package docstring."""

    def __init__(self, config: S3Config, name: str = "s3", *, client: Any = None) -> None:
        self.config = config
        self.name = name
        self._base = f"{config.prefix}/" if config.prefix else ""
        self.retry = RetryPolicy(
            config.max_attempts, config.retry_base_delay, config.retry_max_delay
        )
        self._client = client
        self._errors = S3Errors(name, config, lambda: self.endpoint)
        self._warned_unverifiable = False

    # -- the client -------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The boto3 S3 client (thread-safe), made on first use; one per configuration and
        AWS environment in the process (a fan-out opens the same repository several times)."""
        if self._client is None:
            key = (repr(self.config), sorted(kv for kv in os.environ.items() if "AWS" in kv[0]))
            with _CLIENTS_LOCK:
                if self._client is None:
                    self._client = _CLIENTS.get(repr(key)) or self._make_client()
                    _CLIENTS[repr(key)] = self._client
        return self._client

    def _make_client(self) -> Any:
        cfg = self.config
        try:
            session = botocore.session.Session(profile=cfg.profile)
            # One loader for the whole process: it reads botocore's service model (megabytes of
            # JSON) once, not once for every repository opened.
            session.register_component("data_loader", _loader())
            session.get_scoped_config()  # an unknown profile fails here
        except ProfileNotFound:
            raise ConfigError(
                f"AWS profile '{cfg.profile}' of S3 repository '{self.name}' does not exist",
                hint="define it in ~/.aws/config (or AWS_CONFIG_FILE), or remove 'profile'",
            ) from None
        botocore_config = Config(
            region_name=cfg.region,
            # One retry policy, drkit's (it also covers streaming bodies); botocore's is off.
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=cfg.connect_timeout,
            read_timeout=cfg.read_timeout,
            max_pool_connections=max(16, 4 * cfg.max_concurrency),
            s3={
                "addressing_style": "path" if cfg.path_style else "auto",
                # Every request with a body carries x-amz-checksum-sha256 (a signed header the
                # store verifies), so SigV4 need not hash each body again (botocore otherwise
                # does over plain http).
                "payload_signing_enabled": False,
            },
            user_agent_extra=f"drkit/{__version__}",
            **cfg.extra,
        )
        return session.create_client(
            "s3", region_name=cfg.region, endpoint_url=cfg.endpoint_url, config=botocore_config
        )

    @property
    def endpoint(self) -> str:
        """The endpoint URL requests go to, for messages."""
        try:
            return str(self.client.meta.endpoint_url)
        except Exception:  # a message must not fail because the client cannot be made
            return self.config.endpoint_url or "AWS S3"

    # -- the Storage protocol ---------------------------------------------------------------------

    def open_write(self, key: str, *, retain_until: datetime | None = None) -> _S3Writer:
        """Start writing `key`; see `Storage.open_write`.

        `retain_until` overrides the Object Lock retain-until date for this object (the mode
        stays the configured one); it needs `object_lock` in the configuration.
        """
        s3key = self._s3key(key)
        if retain_until is not None:
            retain_until = self._check_retain_until(retain_until)
        if self._head(s3key, "writing", key) is not None:
            raise self._errors.exists(key)
        return _S3Writer(self, key, s3key, retain_until)

    def write_bytes(
        self, key: str, data: bytes, *, retain_until: datetime | None = None
    ) -> WrittenObject:
        with self.open_write(key, retain_until=retain_until) as writer:
            writer.write(data)
        return writer.commit()

    def open_read(self, key: str, offset: int = 0, length: int | None = None) -> BinaryIO:
        s3key = self._s3key(key)
        validate_range(offset, length)
        if length == 0:
            if self._head(s3key, "reading", key) is None:
                raise self._errors.not_found(key)
            return io.BytesIO(b"")
        chunk = self.config.part_size
        first = chunk if length is None else min(length, chunk)
        try:
            resp = self._get_range(
                key, s3key, offset, offset + first, passthrough=frozenset({"InvalidRange"})
            )
        except ClientError:  # 416: the object exists, the range starts at or past its end
            if offset == 0:
                self._verify_empty(key, s3key)
            return io.BytesIO(b"")
        total = _total_size(resp)
        end = total if length is None else min(total, offset + length)
        body = resp["Body"]
        etag = resp.get("ETag")
        verifier = None
        if offset == 0 and end == total:
            verifier = _Verifier(self, key, s3key, etag, resp.get("Metadata") or {}, total)
        first_end = offset + int(resp["ContentLength"])
        source: _Source
        if first_end >= end or self.config.max_concurrency == 1:
            source = _StreamSource(self, key, s3key, etag, offset, end, body)
        else:
            source = _ParallelSource(self, key, s3key, etag, offset, first_end, end, body)
        return io.BufferedReader(_ObjectReader(source, verifier), READ_BUFFER)

    def stat(self, key: str) -> ObjectInfo:
        s3key = self._s3key(key)
        head = self._head(s3key, "reading", key)
        if head is None:
            raise self._errors.not_found(key)
        return ObjectInfo(key, int(head["ContentLength"]))

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        validate_prefix(prefix)
        full = self._base + prefix
        found: list[ObjectInfo] = []
        token: str | None = None
        while True:
            args: dict[str, Any] = {"Bucket": self.config.bucket, "Prefix": full}
            if token:
                args["ContinuationToken"] = token
            page = self._call("listing", prefix or "/", functools.partial(self._list_page, args))
            for item in page.get("Contents", ()):
                key = item["Key"][len(self._base) :]
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
        s3key = self._s3key(key)
        head = self._head(s3key, "deleting", key)
        if head is None:
            return  # deleting is idempotent
        # In a versioned bucket this names the version, which is removed for good (a plain delete
        # would only add a delete marker, keep the bytes, and bypass Object Lock's refusal).
        args = self._version_args(s3key, head)
        try:
            self._call(
                "deleting",
                key,
                lambda: self.client.delete_object(**args),
                passthrough=_ACCESS_DENIED,
            )
        except ClientError as err:
            locked = self._errors.locked(key, head)
            if locked is not None:
                raise locked from None
            raise self._errors.failed(err, "deleting", key) from err

    # -- helpers for the writer and the readers ---------------------------------------------------

    def _list_page(self, args: dict[str, Any]) -> Any:
        return self.client.list_objects_v2(**args)

    def _s3key(self, key: str) -> str:
        validate_key(key)
        s3key = self._base + key
        if len(s3key.encode("utf-8")) > MAX_KEY_BYTES:
            raise ValueError(
                f"storage key {key!r} is too long for S3 below prefix '{self.config.prefix}'"
                f" ({MAX_KEY_BYTES} bytes at most in all)"
            )
        return s3key

    def _call(
        self,
        action: str,
        key: str,
        fn: Callable[[], T],
        *,
        attempts: Attempts | None = None,
        passthrough: frozenset[str] = frozenset(),
    ) -> T:
        """`fn()` with retries; errors become StorageError, except ClientErrors whose code is in
        `passthrough`, which are raised as they are for the caller to interpret."""
        counter = attempts or Attempts()
        try:
            return retry_call(
                fn, self.retry, is_transient, describe=f"{action} '{key}'", attempts=counter
            )
        except ClientError as err:
            if _code(err) in passthrough:
                raise
            raise self._errors.failed(err, action, key, counter.count) from err
        except (BotoCoreError, urllib3.exceptions.HTTPError, OSError) as err:
            raise self._errors.failed(err, action, key, counter.count) from err

    def _head(self, s3key: str, action: str, key: str, **extra: Any) -> dict[str, Any] | None:
        """HeadObject, or None if there is no such object."""
        try:
            return self._head_object(s3key, action, key, **extra)
        except ObjectNotFound:
            return None

    def _head_object(
        self,
        s3key: str,
        action: str,
        key: str,
        *,
        passthrough: frozenset[str] = frozenset(),
        **extra: Any,
    ) -> dict[str, Any]:
        """HeadObject with retries; see `_call` for `passthrough`."""
        head: dict[str, Any] = self._call(
            action,
            key,
            lambda: self.client.head_object(Bucket=self.config.bucket, Key=s3key, **extra),
            passthrough=passthrough,
        )
        return head

    def _get_range(
        self,
        key: str,
        s3key: str,
        start: int,
        stop: int,
        *,
        etag: str | None = None,
        passthrough: frozenset[str] = frozenset(),
    ) -> dict[str, Any]:
        """GetObject of bytes [start, stop), of exactly the version with `etag` if one is given;
        see `_call` for `passthrough`."""
        extra: dict[str, Any] = {"IfMatch": etag} if etag else {}
        resp: dict[str, Any] = self._call(
            "reading",
            key,
            lambda: self.client.get_object(
                Bucket=self.config.bucket, Key=s3key, Range=f"bytes={start}-{stop - 1}", **extra
            ),
            passthrough=passthrough,
        )
        return resp

    def _version_args(self, s3key: str, head: dict[str, Any]) -> dict[str, Any]:
        """Bucket and Key of the object `head` describes, and its VersionId if it has a real one
        (not "null")."""
        args: dict[str, Any] = {"Bucket": self.config.bucket, "Key": s3key}
        version = head.get("VersionId")
        if version and version != "null":
            args["VersionId"] = version
        return args

    def _object_args(self, retain_until: datetime | None) -> dict[str, Any]:
        """Storage class, encryption and retention for PutObject / CreateMultipartUpload."""
        cfg = self.config
        args: dict[str, Any] = {}
        if cfg.storage_class:
            args["StorageClass"] = cfg.storage_class
        if cfg.sse:
            args["ServerSideEncryption"] = cfg.sse
            if cfg.sse_kms_key_id:
                args["SSEKMSKeyId"] = cfg.sse_kms_key_id
        if cfg.object_lock is not None:
            if retain_until is None:
                retain_until = _ceil_second(
                    datetime.now(UTC) + timedelta(days=cfg.object_lock.days)
                )
            args["ObjectLockMode"] = cfg.object_lock.mode
            args["ObjectLockRetainUntilDate"] = retain_until
        return args

    def _check_retain_until(self, when: datetime) -> datetime:
        if self.config.object_lock is None:
            raise ValueError(
                f"retain_until needs object_lock in the configuration of repository '{self.name}'"
            )
        if when.tzinfo is None:
            raise ValueError("retain_until must be timezone-aware")
        when = _ceil_second(when.astimezone(UTC))
        if when <= datetime.now(UTC):
            raise ValueError(f"retain_until {when.isoformat()} is not in the future")
        return when

    def _verify_empty(self, key: str, s3key: str) -> None:
        """A whole read of an object that answered 416 at offset 0: it must be empty, as written."""
        head = self._head(s3key, "reading", key)
        if head is None:
            raise self._errors.not_found(key)
        verifier = _Verifier(self, key, s3key, head.get("ETag"), head.get("Metadata") or {}, 0)
        verifier.finish()

    def _stored_checksum(self, key: str, s3key: str, etag: str | None) -> _StoredChecksum:
        """The checksums the store keeps for the object (HeadObject with ChecksumMode)."""
        return _StoredChecksum.from_head(self._checked_head(key, s3key, etag))

    def _checked_head(self, key: str, s3key: str, etag: str | None) -> dict[str, Any]:
        """HeadObject with the stored checksums, of exactly the version with this ETag."""
        extra: dict[str, Any] = {"ChecksumMode": "ENABLED"}
        if etag:
            extra["IfMatch"] = etag
        try:
            return self._head_object(
                s3key, "reading", key, passthrough=_PRECONDITION_FAILED, **extra
            )
        except ClientError:
            raise self._errors.changed(key) from None

    def _warn_unverifiable(self, key: str) -> None:
        if not self._warned_unverifiable:
            self._warned_unverifiable = True
            log.warning(
                "S3 repository '%s': multipart object '%s' has no SHA-256 checksum in the store"
                " (an S3 service without checksum support?); drkit cannot check it at this"
                " layer, the AEAD of the repository format still authenticates its frames",
                self.name,
                key,
            )


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


def _ceil_second(when: datetime) -> datetime:
    if when.microsecond:
        when = when.replace(microsecond=0) + timedelta(seconds=1)
    return when
