"""S3Bucket: one bucket below a key prefix, as the storage, its writers and its readers use it.

It owns the S3 client, the error messages (S3Errors) and the requests drkit sends, each wrapped
in drkit.storage.retry's policy; `S3Storage`, `_S3Writer` and the readers all talk to the store
through it, so none of them reaches into another's internals.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import botocore.loaders
import botocore.session
import urllib3.exceptions
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ProfileNotFound

from drkit import __version__
from drkit.errors import ConfigError, ObjectNotFound
from drkit.storage.base import MAX_KEY_BYTES, validate_key
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

T = TypeVar("T")

log = logging.getLogger(__name__)

_CLIENTS_LOCK = threading.Lock()  # botocore: making clients is not thread-safe
_CLIENTS: dict[str, Any] = {}
_LOADER: Any = None


def _loader() -> Any:
    global _LOADER
    if _LOADER is None:
        _LOADER = botocore.loaders.create_loader()
    return _LOADER


class S3Bucket:
    """The bucket and prefix of one S3 repository: client, requests with retries, errors."""

    def __init__(self, config: S3Config, name: str, client: Any = None) -> None:
        self.config = config
        self.name = name
        self.base = f"{config.prefix}/" if config.prefix else ""
        self.retry = RetryPolicy(
            config.max_attempts, config.retry_base_delay, config.retry_max_delay
        )
        self._client = client
        self.errors = S3Errors(name, config, lambda: self.endpoint)
        self._warned_unverifiable = False
        # Whether PutObject's ETag is the MD5 of the stored body (AWS, MinIO and moto without
        # encryption); cleared by the first write that shows otherwise (s3/writer.py)
        self.etags_are_md5 = True

    # -- the client -------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the client has been made (nothing is sent before the first request)."""
        return self._client is not None

    @property
    def client(self) -> Any:
        """The botocore S3 client (thread-safe), made on first use; one per configuration and
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

    # -- requests ---------------------------------------------------------------------------------

    def s3key(self, key: str) -> str:
        """The bucket key of storage key `key`; ValueError if it is invalid or too long."""
        validate_key(key)
        s3key = self.base + key
        if len(s3key.encode("utf-8")) > MAX_KEY_BYTES:
            raise ValueError(
                f"storage key {key!r} is too long for S3 below prefix '{self.config.prefix}'"
                f" ({MAX_KEY_BYTES} bytes at most in all)"
            )
        return s3key

    def call(
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
            raise self.errors.failed(err, action, key, counter.count) from err
        except (BotoCoreError, urllib3.exceptions.HTTPError, OSError) as err:
            raise self.errors.failed(err, action, key, counter.count) from err

    def head(self, s3key: str, action: str, key: str, **extra: Any) -> dict[str, Any] | None:
        """HeadObject, or None if there is no such object."""
        try:
            return self.head_object(s3key, action, key, **extra)
        except ObjectNotFound:
            return None

    def head_object(
        self,
        s3key: str,
        action: str,
        key: str,
        *,
        passthrough: frozenset[str] = frozenset(),
        **extra: Any,
    ) -> dict[str, Any]:
        """HeadObject with retries; see `call` for `passthrough`."""
        head: dict[str, Any] = self.call(
            action,
            key,
            lambda: self.client.head_object(Bucket=self.config.bucket, Key=s3key, **extra),
            passthrough=passthrough,
        )
        return head

    def get_range(
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
        see `call` for `passthrough`."""
        extra: dict[str, Any] = {"IfMatch": etag} if etag else {}
        resp: dict[str, Any] = self.call(
            "reading",
            key,
            lambda: self.client.get_object(
                Bucket=self.config.bucket, Key=s3key, Range=f"bytes={start}-{stop - 1}", **extra
            ),
            passthrough=passthrough,
        )
        return resp

    def delete(self, key: str) -> None:
        """Delete `key` for good; see `Storage.delete` and the S3Storage module docstring."""
        s3key = self.s3key(key)
        head = self.head(s3key, "deleting", key)
        if head is None:
            return  # deleting is idempotent
        # In a versioned bucket this names the version, which is removed for good (a plain delete
        # would only add a delete marker, keep the bytes, and bypass Object Lock's refusal).
        args = self.version_args(s3key, head)
        try:
            self.call(
                "deleting",
                key,
                lambda: self.client.delete_object(**args),
                passthrough=_ACCESS_DENIED,
            )
        except ClientError as err:
            locked = self.errors.locked(key, head)
            if locked is not None:
                raise locked from None
            raise self.errors.failed(err, "deleting", key) from err

    def version_args(self, s3key: str, head: dict[str, Any]) -> dict[str, Any]:
        """Bucket and Key of the object `head` describes, and its VersionId if it has a real one
        (not "null")."""
        args: dict[str, Any] = {"Bucket": self.config.bucket, "Key": s3key}
        version = head.get("VersionId")
        if version and version != "null":
            args["VersionId"] = version
        return args

    def object_args(self, retain_until: datetime | None) -> dict[str, Any]:
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
                retain_until = ceil_second(datetime.now(UTC) + timedelta(days=cfg.object_lock.days))
            args["ObjectLockMode"] = cfg.object_lock.mode
            args["ObjectLockRetainUntilDate"] = retain_until
        return args

    def stored_checksum(self, key: str, s3key: str, etag: str | None) -> _StoredChecksum:
        """The checksums the store keeps for the object (HeadObject with ChecksumMode)."""
        return _StoredChecksum.from_head(self.checked_head(key, s3key, etag))

    def checked_head(self, key: str, s3key: str, etag: str | None) -> dict[str, Any]:
        """HeadObject with the stored checksums, of exactly the version with this ETag."""
        extra: dict[str, Any] = {"ChecksumMode": "ENABLED"}
        if etag:
            extra["IfMatch"] = etag
        try:
            return self.head_object(
                s3key, "reading", key, passthrough=_PRECONDITION_FAILED, **extra
            )
        except ClientError:
            raise self.errors.changed(key) from None

    def warn_unverifiable(self, key: str) -> None:
        """Warn once per repository that an object's checksum cannot be checked at this layer."""
        if not self._warned_unverifiable:
            self._warned_unverifiable = True
            log.warning(
                "S3 repository '%s': multipart object '%s' has no SHA-256 checksum in the store"
                " (an S3 service without checksum support?); drkit cannot check it at this"
                " layer, the AEAD of the repository format still authenticates its frames",
                self.name,
                key,
            )


def ceil_second(when: datetime) -> datetime:
    """`when` rounded up to a whole second (S3 keeps retain-until dates in seconds)."""
    if when.microsecond:
        when = when.replace(microsecond=0) + timedelta(seconds=1)
    return when
