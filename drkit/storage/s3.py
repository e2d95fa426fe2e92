"""Storage in an S3 bucket (AWS S3, MinIO, Ceph RGW, ...), below an optional key prefix.

Object ``<key>`` lives at ``<prefix>/<key>`` in the bucket. Nothing is sent on construction; the
boto3 client is made at the first call. Credentials come only from the standard AWS chain
(environment, shared profile, web identity / IRSA, container and instance metadata), never from
drkit's configuration.

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

Checksums, checked by drkit
    drkit computes SHA-256 while writing. A single-PUT object carries it as metadata
    (``x-amz-meta-drkit-sha256``) and as ``x-amz-checksum-sha256``, which AWS verifies on upload.
    The metadata of a multipart object is fixed before its data is known, so it carries its part
    size (``x-amz-meta-drkit-part-size``) instead; every part is sent with its SHA-256, and the
    store keeps the composite checksum (SHA-256 of the part digests, ``<b64>-<parts>``). After
    completing, drkit compares the store's composite with its own, so a store that does not
    validate (moto) cannot keep damaged parts unnoticed.
    A read of a whole object (offset 0 to the end) is verified as it streams: against the
    metadata digest, or, for a multipart object, by recomputing the composite from the part
    boundaries. A mismatch raises IntegrityError before the last bytes are returned. An object
    with neither metadata was not written by drkit (or was replaced) and fails too. A multipart
    object whose store keeps no SHA-256 composite (a store without checksum support, or a copy
    made by another tool with other part sizes) cannot be checked by this layer; it is read
    with a warning. Ranged reads are not verified here: the frame AEAD of the repository format
    authenticates every range drkit reads.

Reads
    Ranged GETs (``Range: bytes=a-b``), streamed from the response body. A read of more than one
    `part_size` chunk fetches chunks in parallel (at most `max_concurrency` chunks buffered)
    with ``If-Match`` on the first reply's ETag, so a replaced object cannot be spliced.
    A range past the end is the 416 reply, read as no bytes.

Retries
    Throttling (SlowDown, 503), 5xx, connection errors and resets, and timeouts are retried by
    drkit (drkit.storage.retry, exponential backoff with full jitter; botocore's own retries are
    off so there is one policy), at most `max_attempts` times per call. A response body that
    breaks mid-stream is resumed with a new ranged GET from the byte where it broke. After the
    last attempt the error names the repository, the endpoint, the bucket and the key.

Object Lock
    With `object_lock` configured, PutObject and CreateMultipartUpload carry ObjectLockMode and
    ObjectLockRetainUntilDate (write time + days, or `open_write(key, retain_until=...)` for one
    object). A multipart object is checked after completion, and a store that ignored the
    retention on CreateMultipartUpload (moto does) gets it with PutObjectRetention; until that
    request returns the object is visible without its lock (a crash leaves it unlocked, never
    missing).

Delete
    Deleting in a versioned bucket (Object Lock needs versioning) removes the current version
    itself, not just hides it behind a delete marker, so storage is freed and a version under
    Object Lock retention is refused by the store: that raises ObjectLocked, which prune reports
    and skips. Older, noncurrent versions are left to the bucket's lifecycle rules.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import io
import logging
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, TypeVar

import boto3
import urllib3.exceptions
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from drkit import __version__
from drkit.errors import (
    ConfigError,
    IntegrityError,
    ObjectExists,
    ObjectLocked,  # drkit.errors' class, so prune catches it without importing boto3
    ObjectNotFound,
    StorageError,
)
from drkit.storage.base import (
    MAX_KEY_BYTES,
    BaseStorage,
    BaseWriter,
    ObjectInfo,
    WrittenObject,
    validate_key,
    validate_prefix,
    validate_range,
)
from drkit.storage.retry import Attempts, RetryPolicy, retry_call

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

T = TypeVar("T")

log = logging.getLogger(__name__)

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PART_SIZE = 5 * 1024 * MiB
MAX_PARTS = 10_000
MAX_SINGLE_PUT = 5 * 1024 * MiB
DEFAULT_PART_SIZE = 16 * MiB
READ_BUFFER = 256 * 1024

META_SHA256 = "drkit-sha256"
META_PART_SIZE = "drkit-part-size"
META_WRITE_ID = "drkit-write-id"

# Storage classes whose objects cannot be read without a restore request: drkit must be able to
# read every object back (verify, restore, drills), so these are refused.
UNREADABLE_STORAGE_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE"})

_NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchVersion"})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "ConditionalRequestConflict",  # concurrent conditional writes: retry decides who won
        "BadDigest",  # damaged in transit: sending the same bytes again is the cure
        "XAmzContentSHA256Mismatch",
        "OperationAborted",
    }
)
_ACCESS_DENIED = frozenset({"AccessDenied", "403", "Forbidden", "AllAccessDisabled"})
_BAD_CREDENTIALS = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
    }
)


@dataclass(frozen=True)
class ObjectLock:
    """Object Lock retention applied to every object written: mode and days from the write."""

    mode: Literal["GOVERNANCE", "COMPLIANCE"]
    days: int

    def __post_init__(self) -> None:
        if self.mode not in ("GOVERNANCE", "COMPLIANCE"):
            raise ValueError(
                f"object lock mode must be GOVERNANCE or COMPLIANCE, not {self.mode!r}"
            )
        if self.days < 1:
            raise ValueError(f"object lock days must be at least 1, got {self.days}")


@dataclass(frozen=True)
class S3Config:
    """Where the repository lives and how drkit talks to it (docs/s3.md explains each field)."""

    bucket: str
    prefix: str = ""
    region: str | None = None
    endpoint_url: str | None = None
    force_path_style: bool | None = None
    """Path-style addressing (``endpoint/bucket/key``); default: true when endpoint_url is set."""
    profile: str | None = None
    """A named profile of the shared AWS config (not a credential); None: the default chain."""
    storage_class: str | None = None
    sse: Literal["AES256", "aws:kms"] | None = None
    sse_kms_key_id: str | None = None
    object_lock: ObjectLock | None = None
    multipart_threshold: int = DEFAULT_PART_SIZE
    part_size: int = DEFAULT_PART_SIZE
    max_concurrency: int = 4
    max_attempts: int = 5
    retry_base_delay: float = 0.2
    retry_max_delay: float = 20.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """Extra botocore Config arguments (tests, unusual proxies)."""

    def __post_init__(self) -> None:
        if not self.bucket:
            raise ValueError("the S3 bucket name must not be empty")
        prefix = self.prefix.strip("/")
        if prefix:
            validate_key(prefix)
        object.__setattr__(self, "prefix", prefix)
        if self.sse not in (None, "AES256", "aws:kms"):
            raise ValueError(f"sse must be 'AES256' or 'aws:kms', not {self.sse!r}")
        if self.sse_kms_key_id and self.sse != "aws:kms":
            raise ValueError("sse_kms_key_id needs sse = 'aws:kms'")
        if self.storage_class and self.storage_class.upper() in UNREADABLE_STORAGE_CLASSES:
            raise ValueError(
                f"storage class {self.storage_class!r} cannot be read without a restore request;"
                " drkit reads every object back (verify, restore, drills): use GLACIER_IR,"
                " STANDARD_IA or a lifecycle rule instead"
            )
        if not MIN_PART_SIZE <= self.part_size <= MAX_PART_SIZE:
            raise ValueError(
                f"part_size must be between {MIN_PART_SIZE} and {MAX_PART_SIZE} bytes,"
                f" got {self.part_size}"
            )
        if not 0 <= self.multipart_threshold <= MAX_SINGLE_PUT:
            raise ValueError(
                f"multipart_threshold must be between 0 and {MAX_SINGLE_PUT} bytes,"
                f" got {self.multipart_threshold}"
            )
        if not 1 <= self.max_concurrency <= 64:
            raise ValueError(
                f"max_concurrency must be between 1 and 64, got {self.max_concurrency}"
            )
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")

    @property
    def path_style(self) -> bool:
        if self.force_path_style is not None:
            return self.force_path_style
        return self.endpoint_url is not None


class S3Storage(BaseStorage):
    """Objects below `config.prefix` in `config.bucket`; see the module docstring."""

    def __init__(self, config: S3Config, name: str = "s3", *, client: Any = None) -> None:
        self.config = config
        self.name = name
        self._base = f"{config.prefix}/" if config.prefix else ""
        self.retry = RetryPolicy(
            config.max_attempts, config.retry_base_delay, config.retry_max_delay
        )
        self._client = client
        self._client_lock = threading.Lock()
        self._warned_unverifiable = False

    # -- the client -------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The boto3 S3 client (thread-safe), made on first use."""
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    def _make_client(self) -> Any:
        cfg = self.config
        try:
            session = boto3.session.Session(profile_name=cfg.profile, region_name=cfg.region)
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
            s3={"addressing_style": "path" if cfg.path_style else "auto"},
            user_agent_extra=f"drkit/{__version__}",
            **cfg.extra,
        )
        return session.client("s3", endpoint_url=cfg.endpoint_url, config=botocore_config)

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
            raise self._exists_error(key)
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
                raise self._not_found_error(key)
            return io.BytesIO(b"")
        chunk = self.config.part_size
        first = chunk if length is None else min(length, chunk)
        try:
            resp = self._call(
                "reading",
                key,
                lambda: self.client.get_object(
                    Bucket=self.config.bucket,
                    Key=s3key,
                    Range=f"bytes={offset}-{offset + first - 1}",
                ),
                passthrough=frozenset({"InvalidRange"}),
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
            raise self._not_found_error(key)
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
        args: dict[str, Any] = {"Bucket": self.config.bucket, "Key": s3key}
        version = head.get("VersionId")
        if version and version != "null":
            # A versioned bucket: remove this version for good (a plain delete would only add a
            # delete marker, keep the bytes, and bypass Object Lock's refusal).
            args["VersionId"] = version
        try:
            self._call(
                "deleting",
                key,
                lambda: self.client.delete_object(**args),
                passthrough=_ACCESS_DENIED,
            )
        except ClientError as err:
            locked = self._locked_error(key, head)
            if locked is not None:
                raise locked from None
            raise self._error(err, "deleting", key) from err

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
            raise self._error(err, action, key, counter.count) from err
        except (BotoCoreError, urllib3.exceptions.HTTPError, OSError) as err:
            raise self._error(err, action, key, counter.count) from err

    def _head(self, s3key: str, action: str, key: str, **extra: Any) -> dict[str, Any] | None:
        """HeadObject, or None if there is no such object."""
        try:
            head: dict[str, Any] = self._call(
                action,
                key,
                lambda: self.client.head_object(Bucket=self.config.bucket, Key=s3key, **extra),
            )
        except ObjectNotFound:
            return None
        return head

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
            raise self._not_found_error(key)
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
            head = self._call(
                "reading",
                key,
                lambda: self.client.head_object(Bucket=self.config.bucket, Key=s3key, **extra),
                passthrough=frozenset({"PreconditionFailed", "412"}),
            )
        except ClientError:
            raise self._changed_error(key) from None
        result: dict[str, Any] = head
        return result

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

    # -- errors -----------------------------------------------------------------------------------

    def _where(self) -> str:
        prefix = f", prefix '{self.config.prefix}'" if self.config.prefix else ""
        return f"S3 repository '{self.name}' (bucket '{self.config.bucket}'{prefix})"

    def _error(self, err: BaseException, action: str, key: str, attempts: int = 1) -> StorageError:
        cfg = self.config
        where = self._where()
        tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
        if isinstance(err, ClientError):
            code = _code(err)
            message = _message(err)
            status = _status(err)
            if code in _NOT_FOUND:
                return self._not_found_error(key)
            if code == "NoSuchBucket":
                lock = " --object-lock-enabled-for-bucket" if cfg.object_lock else ""
                return StorageError(
                    f"bucket '{cfg.bucket}' of S3 repository '{self.name}' does not exist"
                    f" at {self.endpoint}",
                    hint=f"create it first (aws s3api create-bucket --bucket {cfg.bucket}{lock}),"
                    " or correct 'bucket', 'region' or 'endpoint_url' of the repository",
                )
            if code in _ACCESS_DENIED:
                return StorageError(
                    f"access denied {action} '{key}' in {where}: {message}",
                    hint="the AWS credentials drkit found lack a permission on the bucket;"
                    " docs/s3.md lists the least-privilege IAM policy drkit needs",
                )
            if code in _BAD_CREDENTIALS:
                return StorageError(
                    f"S3 rejected the credentials {action} '{key}' in {where}: {code}: {message}",
                    hint="check the AWS credential chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,"
                    " AWS_PROFILE, web identity / IRSA) and the endpoint's region",
                )
            if cfg.object_lock is not None and (
                code == "LockNotEnabled" or "objectlock" in message.lower().replace(" ", "")
            ):
                return StorageError(
                    f"{action} '{key}' in {where} failed: {code}: {message}",
                    hint="the repository sets object_lock, so the bucket must have Object Lock"
                    " enabled (it can only be enabled at creation on most stores)",
                )
            if _is_transient_client_error(err):
                return StorageError(
                    f"S3 repository '{self.name}' at {self.endpoint} kept failing {action} '{key}'"
                    f" in bucket '{cfg.bucket}': {code} (HTTP {status}): {message};"
                    f" gave up after {tries}",
                    hint="the store is overloaded or failing; try again later, or raise"
                    " max_attempts of the repository",
                )
            return StorageError(f"{action} '{key}' in {where} failed: {code}: {message}")
        if isinstance(err, NoCredentialsError | PartialCredentialsError):
            return StorageError(
                f"no usable AWS credentials for S3 repository '{self.name}': {err}",
                hint="drkit takes credentials only from the AWS chain: AWS_ACCESS_KEY_ID and"
                " AWS_SECRET_ACCESS_KEY, AWS_PROFILE / 'profile', web identity (IRSA), or"
                " instance metadata; docs/s3.md",
            )
        if is_transient(err):
            return StorageError(
                f"unable to reach S3 repository '{self.name}' at {self.endpoint}: {_reason(err)}"
                f" ({action} '{key}' in bucket '{cfg.bucket}', gave up after {tries})",
                hint="check that the endpoint is up and reachable from this host (DNS, firewall,"
                " proxy, TLS); drkit retries with backoff up to the repository's max_attempts",
            )
        return StorageError(f"{action} '{key}' in {where} failed: {_reason(err)}")

    def _locked_error(self, key: str, head: dict[str, Any]) -> ObjectLocked | None:
        until = head.get("ObjectLockRetainUntilDate")
        mode = head.get("ObjectLockMode")
        if head.get("ObjectLockLegalHoldStatus") == "ON":
            return ObjectLocked(
                f"object '{key}' in {self._where()} is under an Object Lock legal hold and cannot"
                " be deleted",
                hint="someone placed a legal hold on it; it stays until the hold is removed",
            )
        if isinstance(until, datetime) and until > datetime.now(UTC):
            return ObjectLocked(
                f"object '{key}' in {self._where()} is protected by Object Lock ({mode}) until"
                f" {until.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC and cannot be deleted before then",
                hint="retention comes from the repository's object_lock setting; prune skips"
                " locked objects and removes them once their retention has passed",
                until=until,
            )
        return None

    def _exists_error(self, key: str) -> ObjectExists:
        return ObjectExists(f"object '{key}' already exists in repository '{self.name}'")

    def _not_found_error(self, key: str) -> ObjectNotFound:
        return ObjectNotFound(f"object '{key}' not found in repository '{self.name}'")

    def _changed_error(self, key: str) -> StorageError:
        return StorageError(
            f"object '{key}' in {self._where()} was replaced while being read",
            hint="objects are write-once: something outside drkit deleted and rewrote it",
        )

    def _integrity_error(self, key: str, detail: str) -> IntegrityError:
        return IntegrityError(
            f"object '{key}' in {self._where()} is damaged: {detail}",
            hint="read it from another copy (restore falls back to the next repository) and"
            " check who can write to the bucket; 'drkit verify' checks every object",
        )


class _S3Writer(BaseWriter):
    """Buffers one part; a single PUT up to the threshold, else a parallel multipart upload."""

    def __init__(
        self, storage: S3Storage, key: str, s3key: str, retain_until: datetime | None
    ) -> None:
        super().__init__(key)
        self._storage = storage
        self._s3key = s3key
        self._retain_until = retain_until
        self._write_id = secrets.token_hex(16)
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._futures: list[Future[tuple[dict[str, Any], bytes]]] = []
        self._slots = threading.Semaphore(storage.config.max_concurrency)
        self._object_args: dict[str, Any] = {}
        self._next_part = 1

    # BaseWriter hooks

    def _write(self, data: bytes | memoryview) -> None:
        cfg = self._storage.config
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
        storage = self._storage
        with contextlib.suppress(ClientError):  # NoSuchUpload: already gone
            storage._call(
                "discarding",
                self.key,
                lambda: storage.client.abort_multipart_upload(
                    Bucket=storage.config.bucket, Key=self._s3key, UploadId=upload_id
                ),
                passthrough=frozenset({"NoSuchUpload"}),
            )

    # single PUT

    def _put(self) -> None:
        storage = self._storage
        body, self._buffer = bytes(self._buffer), bytearray()
        digest = self._sha256.digest()
        args = storage._object_args(self._retain_until)
        attempts = Attempts()
        try:
            storage._call(
                "writing",
                self.key,
                lambda: storage.client.put_object(
                    Bucket=storage.config.bucket,
                    Key=self._s3key,
                    Body=body,
                    IfNoneMatch="*",
                    Metadata={META_SHA256: digest.hex(), META_WRITE_ID: self._write_id},
                    ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=_b64(digest),
                    **args,
                ),
                attempts=attempts,
                passthrough=frozenset({"PreconditionFailed", "412"}),
            )
        except ClientError:
            if attempts.count > 1 and self._is_ours():
                return  # an earlier attempt succeeded; its reply was lost
            raise storage._exists_error(self.key) from None

    # multipart

    def _flush_parts(self) -> None:
        cfg = self._storage.config
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
        storage = self._storage
        args = self._object_args = storage._object_args(self._retain_until)
        resp = storage._call(
            "writing",
            self.key,
            lambda: storage.client.create_multipart_upload(
                Bucket=storage.config.bucket,
                Key=self._s3key,
                Metadata={
                    META_PART_SIZE: str(storage.config.part_size),
                    META_WRITE_ID: self._write_id,
                },
                ChecksumAlgorithm="SHA256",
                **args,
            ),
        )
        self._upload_id = resp["UploadId"]
        self._executor = ThreadPoolExecutor(
            storage.config.max_concurrency, thread_name_prefix="drkit-s3-put"
        )

    def _submit(self, part: bytes) -> None:
        self._raise_failed()
        number = self._next_part
        if number > MAX_PARTS:
            raise StorageError(
                f"object '{self.key}' is too large for S3 repository '{self._storage.name}':"
                f" more than {MAX_PARTS} parts of {self._storage.config.part_size} bytes",
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
        storage = self._storage
        digest = hashlib.sha256(part).digest()
        checksum = _b64(digest)
        upload_id = self._upload_id
        resp = storage._call(
            "writing",
            self.key,
            lambda: storage.client.upload_part(
                Bucket=storage.config.bucket,
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
        storage = self._storage
        if self._buffer or self._next_part == 1:
            part, self._buffer = bytes(self._buffer), bytearray()
            self._submit(part)
        results = [future.result() for future in self._futures]
        parts = [entry for entry, _ in results]
        expected = _b64(hashlib.sha256(b"".join(digest for _, digest in results)).digest())
        upload_id = self._upload_id
        attempts = Attempts()
        try:
            resp = storage._call(
                "committing",
                self.key,
                lambda: storage.client.complete_multipart_upload(
                    Bucket=storage.config.bucket,
                    Key=self._s3key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    IfNoneMatch="*",
                ),
                attempts=attempts,
                passthrough=frozenset({"PreconditionFailed", "412", "NoSuchUpload"}),
            )
        except ClientError as err:
            if attempts.count > 1 and self._is_ours():
                resp = {}  # an earlier attempt completed it; its reply was lost
            elif _code(err) == "NoSuchUpload":
                raise storage._error(err, "committing", self.key) from err
            else:
                raise storage._exists_error(self.key) from None
        self._upload_id = None  # completed: nothing left to abort
        self._stop_parts()
        stored = _StoredChecksum(resp.get("ChecksumSHA256"))
        head: dict[str, Any] | None = None
        if not stored.sha256 or "ObjectLockMode" in self._object_args:
            head = storage._checked_head(self.key, self._s3key, resp.get("ETag"))
            stored = stored if stored.sha256 else _StoredChecksum.from_head(head)
        if head is not None and "ObjectLockMode" in self._object_args:
            self._ensure_retention(head)
        if stored.sha256 is None:
            storage._warn_unverifiable(self.key)
        elif stored.matches(expected, len(parts)) is False:
            with contextlib.suppress(StorageError):
                storage.delete(self.key)
            raise StorageError(
                f"S3 repository '{storage.name}' stored '{self.key}' with checksum"
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
        storage = self._storage
        args: dict[str, Any] = {"Bucket": storage.config.bucket, "Key": self._s3key}
        version = head.get("VersionId")
        if version and version != "null":
            args["VersionId"] = version
        retention = {
            "Mode": self._object_args["ObjectLockMode"],
            "RetainUntilDate": self._object_args["ObjectLockRetainUntilDate"],
        }
        log.debug("applying Object Lock retention to '%s' after its multipart upload", self.key)
        storage._call(
            "locking",
            self.key,
            lambda: storage.client.put_object_retention(Retention=retention, **args),
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
        storage = self._storage
        with contextlib.suppress(StorageError):
            head = storage._head(self._s3key, "committing", self.key)
            return (
                head is not None
                and (head.get("Metadata") or {}).get(META_WRITE_ID) == self._write_id
            )
        return False


# -- reading ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _StoredChecksum:
    """What HeadObject reports: the SHA-256 checksum (``<b64>`` or ``<b64>-<parts>``), whether it
    is a full-object one, and whether the store keeps a checksum of another algorithm."""

    sha256: str | None
    full_object: bool = False
    others: bool = False

    @classmethod
    def from_head(cls, head: dict[str, Any]) -> _StoredChecksum:
        others = ("ChecksumCRC32", "ChecksumCRC32C", "ChecksumSHA1", "ChecksumCRC64NVME")
        return cls(
            head.get("ChecksumSHA256"),
            head.get("ChecksumType") == "FULL_OBJECT",
            any(head.get(name) for name in others),
        )

    def matches(self, composite: str, parts: int) -> bool | None:
        """Compare with drkit's composite of `parts` part digests; None if not comparable."""
        if self.sha256 is None or self.full_object:
            return None
        value, _, count = self.sha256.partition("-")
        if count and count != str(parts):
            return None
        return value == composite


class _Source:
    """Bytes of one range of an object, in order."""

    def readinto(self, buffer: memoryview) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _StreamSource(_Source):
    """Streams [pos, end) from a response body, resuming with a new ranged GET when the body
    ends early or breaks (a reset, a timeout)."""

    def __init__(
        self,
        storage: S3Storage,
        key: str,
        s3key: str,
        etag: str | None,
        pos: int,
        end: int,
        body: Any = None,
    ) -> None:
        self._storage = storage
        self._key = key
        self._s3key = s3key
        self._etag = etag
        self._pos = pos
        self._end = end
        self._body = body
        self._failures = 0

    def readinto(self, buffer: memoryview) -> int:
        while self._pos < self._end:
            if self._body is None:
                self._body = self._open()
            view = buffer[: self._end - self._pos]
            if not view:
                return 0
            try:
                count = self._body.readinto(view)
            except Exception as err:
                if not is_transient(err):
                    raise
                self._failures += 1
                self._close_body()
                if self._failures >= self._storage.retry.max_attempts:
                    raise self._storage._error(err, "reading", self._key, self._failures) from err
                log.debug("reading '%s' broke at byte %d: %s; resuming", self._key, self._pos, err)
                time.sleep(self._storage.retry.delay(self._failures))
                continue
            if not count:
                self._close_body()  # this response is done; the next GET continues
                continue
            self._pos += count
            self._failures = 0
            return count
        self._close_body()
        return 0

    def _open(self) -> Any:
        storage = self._storage
        extra: dict[str, Any] = {"IfMatch": self._etag} if self._etag else {}
        try:
            resp = storage._call(
                "reading",
                self._key,
                lambda: storage.client.get_object(
                    Bucket=storage.config.bucket,
                    Key=self._s3key,
                    Range=f"bytes={self._pos}-{self._end - 1}",
                    **extra,
                ),
                passthrough=frozenset({"PreconditionFailed", "412", "InvalidRange"}),
            )
        except ClientError as err:
            if _code(err) == "InvalidRange":
                raise StorageError(
                    f"object '{self._key}' in {storage._where()} ended at byte {self._pos},"
                    f" before the {self._end} bytes it had when the read began"
                ) from None
            raise storage._changed_error(self._key) from None
        return resp["Body"]

    def _close_body(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):
                self._body.close()
            self._body = None

    def close(self) -> None:
        self._close_body()


class _ParallelSource(_Source):
    """Fetches `part_size` chunks of [first_end, end) in parallel, keeping at most
    `max_concurrency` of them in memory; the first chunk comes from the already open body."""

    def __init__(
        self,
        storage: S3Storage,
        key: str,
        s3key: str,
        etag: str | None,
        start: int,
        first_end: int,
        end: int,
        body: Any,
    ) -> None:
        self._storage = storage
        self._key = key
        self._s3key = s3key
        self._etag = etag
        chunk = storage.config.part_size
        self._ranges = deque((pos, min(pos + chunk, end)) for pos in range(first_end, end, chunk))
        self._executor = ThreadPoolExecutor(
            storage.config.max_concurrency, thread_name_prefix="drkit-s3-get"
        )
        self._pending: deque[Future[bytearray]] = deque()
        self._pending.append(self._executor.submit(self._fetch, start, first_end, body))
        while self._ranges and len(self._pending) < storage.config.max_concurrency:
            self._schedule()
        self._current = memoryview(b"")

    def _schedule(self) -> None:
        begin, stop = self._ranges.popleft()
        self._pending.append(self._executor.submit(self._fetch, begin, stop, None))

    def _fetch(self, begin: int, stop: int, body: Any) -> bytearray:
        data = bytearray(stop - begin)
        view = memoryview(data)
        source = _StreamSource(self._storage, self._key, self._s3key, self._etag, begin, stop, body)
        got = 0
        try:
            while got < len(data):
                count = source.readinto(view[got:])
                if not count:
                    raise StorageError(f"reading '{self._key}' ended early at byte {begin + got}")
                got += count
        finally:
            source.close()
        return data

    def readinto(self, buffer: memoryview) -> int:
        if not self._current:
            if not self._pending:
                return 0
            self._current = memoryview(self._pending.popleft().result())
            if self._ranges:
                self._schedule()
        count = min(len(buffer), len(self._current))
        buffer[:count] = self._current[:count]
        self._current = self._current[count:]
        return count

    def close(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)


class _Verifier:
    """Checks a whole-object read against what drkit recorded when it wrote the object."""

    def __init__(
        self,
        storage: S3Storage,
        key: str,
        s3key: str,
        etag: str | None,
        metadata: dict[str, str],
        total: int,
        stored_checksum: Callable[[], _StoredChecksum] | None = None,
    ) -> None:
        self._storage = storage
        self._key = key
        self.total = total
        self.seen = 0
        self._expected = metadata.get(META_SHA256)
        self._whole = hashlib.sha256() if self._expected else None
        part_size = metadata.get(META_PART_SIZE, "")
        self._part_size = int(part_size) if part_size.isdigit() and int(part_size) > 0 else None
        self._part = hashlib.sha256()
        self._part_fill = 0
        self._digests: list[bytes] = []
        self._stored_checksum = stored_checksum or (
            lambda: storage._stored_checksum(key, s3key, etag)
        )
        self._finished = False

    @property
    def done(self) -> bool:
        return self.seen >= self.total

    def update(self, data: memoryview) -> None:
        self.seen += len(data)
        if self._whole is not None:
            self._whole.update(data)
        elif self._part_size is not None:
            while data:
                take = min(len(data), self._part_size - self._part_fill)
                self._part.update(data[:take])
                self._part_fill += take
                data = data[take:]
                if self._part_fill == self._part_size:
                    self._digests.append(self._part.digest())
                    self._part = hashlib.sha256()
                    self._part_fill = 0

    def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self.seen != self.total:
            raise self._storage._integrity_error(
                self._key, f"read {self.seen} bytes but the object has {self.total}"
            )
        if self._whole is not None:
            actual = self._whole.hexdigest()
            if actual != self._expected:
                raise self._storage._integrity_error(
                    self._key, f"its SHA-256 is {actual} but drkit wrote {self._expected}"
                )
            return
        if self._part_size is None:
            raise self._storage._integrity_error(
                self._key,
                f"it carries no drkit checksum (x-amz-meta-{META_SHA256} or"
                f" x-amz-meta-{META_PART_SIZE}): it was not written by drkit, or was replaced",
            )
        if self._part_fill or not self._digests:
            self._digests.append(self._part.digest())
        parts = len(self._digests)
        actual = _b64(hashlib.sha256(b"".join(self._digests)).digest())
        stored = self._stored_checksum()
        if stored.sha256 is None:
            if stored.others:  # the store checksums objects, but this one has no SHA-256 of ours
                raise self._storage._integrity_error(
                    self._key,
                    "the store keeps no SHA-256 checksum for it, so it is not the object drkit"
                    " wrote (drkit sends one with every part)",
                )
            self._storage._warn_unverifiable(self._key)
            return
        match = stored.matches(actual, parts)
        if match is None:
            # Copied by another tool with other part sizes: no longer comparable here.
            self._storage._warn_unverifiable(self._key)
        elif not match:
            raise self._storage._integrity_error(
                self._key,
                f"its composite SHA-256 is {actual}-{parts} but the store recorded {stored.sha256}",
            )


class _ObjectReader(io.RawIOBase):
    """The raw stream `open_read` returns (buffered): bytes from a source, verified if whole."""

    def __init__(self, source: _Source, verifier: _Verifier | None) -> None:
        super().__init__()
        self._source = source
        self._verifier = verifier
        self._failed: BaseException | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        if self._failed is not None:
            raise self._failed
        view = memoryview(buffer).cast("B")
        if not view:
            return 0
        try:
            count = self._source.readinto(view)
            if self._verifier is not None:
                self._verifier.update(view[:count])
                # Verify before handing out the last bytes: a damaged object never reads whole.
                if count == 0 or self._verifier.done:
                    self._verifier.finish()
        except (IntegrityError, StorageError) as err:
            self._failed = err
            raise
        return count

    def close(self) -> None:
        if not self.closed:
            self._source.close()
        super().close()


# -- classification and small helpers --------------------------------------------------------------


def is_transient(err: BaseException) -> bool:
    """Whether retrying the request can help: throttling, 5xx, broken connections, timeouts."""
    if isinstance(err, ClientError):
        return _is_transient_client_error(err)
    if isinstance(err, NoCredentialsError | PartialCredentialsError):
        return False
    if isinstance(err, BotoConnectionError | HTTPClientError | IncompleteReadError):
        return True
    if isinstance(err, urllib3.exceptions.HTTPError):
        return True
    return isinstance(err, ConnectionError | TimeoutError)


def _is_transient_client_error(err: ClientError) -> bool:
    status = _status(err)
    return _code(err) in _TRANSIENT_CODES or status == 429 or status >= 500


def _code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def _message(err: ClientError) -> str:
    error = err.response.get("Error", {})
    return str(error.get("Message") or error.get("Code") or "no message").rstrip(".")


def _status(err: ClientError) -> int:
    return int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _reason(err: BaseException) -> str:
    """The most specific readable cause of a connection-level error ("connection refused")."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current.strerror.lower()
        nested = getattr(current, "kwargs", {}).get("error")
        todo += [current.__cause__, current.__context__, nested]
        todo += [a for a in getattr(current, "args", ()) if isinstance(a, BaseException)]
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            todo.append(reason)
    return str(err)


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


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _ceil_second(when: datetime) -> datetime:
    if when.microsecond:
        when = when.replace(microsecond=0) + timedelta(seconds=1)
    return when


def composite_checksum(data: bytes, part_size: int) -> str:
    """The S3 composite SHA-256 of `data` uploaded in `part_size` parts (``<b64>-<parts>``)."""
    parts = max(1, math.ceil(len(data) / part_size))
    digests = b"".join(
        hashlib.sha256(data[i * part_size : (i + 1) * part_size]).digest() for i in range(parts)
    )
    return f"{_b64(hashlib.sha256(digests).digest())}-{parts}"
