"""Which S3 failures are worth retrying, and the drkit errors that failures become.

Retries
    Throttling (SlowDown, 503), 5xx, connection errors and resets, and timeouts are retried by
    drkit (drkit.storage.retry, exponential backoff with full jitter; botocore's own retries are
    off so there is one policy), at most `max_attempts` times per call. A response body that
    breaks mid-stream is resumed with a new ranged GET from the byte where it broke. After the
    last attempt the error names the repository, the endpoint, the bucket and the key.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import urllib3.exceptions
from botocore.exceptions import (
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from drkit.errors import IntegrityError, ObjectExists, ObjectLocked, ObjectNotFound, StorageError

if TYPE_CHECKING:
    from drkit.storage.s3.config import S3Config

_NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchVersion"})
_PRECONDITION_FAILED = frozenset({"PreconditionFailed", "412"})
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
_DAMAGED_ON_ITS_WAY = frozenset({"BadDigest", "XAmzContentSHA256Mismatch"})
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


class S3Errors:
    """The errors of one S3 repository: each names the repository and the bucket (and the
    endpoint, where reaching it is the problem), with a hint where one helps."""

    def __init__(self, name: str, config: S3Config, endpoint: Callable[[], str]) -> None:
        self._name = name
        self._config = config
        self._endpoint = endpoint
        """The endpoint URL requests go to; it never fails."""

    def where(self) -> str:
        prefix = f", prefix '{self._config.prefix}'" if self._config.prefix else ""
        return f"S3 repository '{self._name}' (bucket '{self._config.bucket}'{prefix})"

    def failed(self, err: BaseException, action: str, key: str, attempts: int = 1) -> StorageError:
        """`err`, raised `action` `key` after `attempts` attempts, as a drkit error."""
        cfg = self._config
        where = self.where()
        tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
        if isinstance(err, ClientError):
            code = _code(err)
            message = _message(err)
            status = _status(err)
            if code in _NOT_FOUND:
                return self.not_found(key)
            if code == "NoSuchBucket":
                lock = " --object-lock-enabled-for-bucket" if cfg.object_lock else ""
                return StorageError(
                    f"bucket '{cfg.bucket}' of S3 repository '{self._name}' does not exist"
                    f" at {self._endpoint()}",
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
            if code in _DAMAGED_ON_ITS_WAY:
                return StorageError(
                    f"S3 repository '{self._name}' at {self._endpoint()} refused the body of"
                    f" '{key}' as damaged on its way ({code}) every time; gave up after {tries}",
                    hint="nothing damaged was stored; something on the network path alters"
                    " request bodies (a proxy, a load balancer, failing hardware): fix it, then"
                    " run again",
                )
            if _is_transient_client_error(err):
                return StorageError(
                    f"S3 repository '{self._name}' at {self._endpoint()} kept failing {action}"
                    f" '{key}' in bucket '{cfg.bucket}': {code} (HTTP {status}): {message};"
                    f" gave up after {tries}",
                    hint="the store is overloaded or failing; try again later, or raise"
                    " max_attempts of the repository",
                )
            return StorageError(f"{action} '{key}' in {where} failed: {code}: {message}")
        if isinstance(err, NoCredentialsError | PartialCredentialsError):
            return StorageError(
                f"no usable AWS credentials for S3 repository '{self._name}': {err}",
                hint="drkit takes credentials only from the AWS chain: AWS_ACCESS_KEY_ID and"
                " AWS_SECRET_ACCESS_KEY, AWS_PROFILE / 'profile', web identity (IRSA), or"
                " instance metadata; docs/s3.md",
            )
        if is_transient(err):
            return StorageError(
                f"unable to reach S3 repository '{self._name}' at {self._endpoint()}:"
                f" {_reason(err)} ({action} '{key}' in bucket '{cfg.bucket}', gave up after"
                f" {tries})",
                hint="check that the endpoint is up and reachable from this host (DNS, firewall,"
                " proxy, TLS); drkit retries with backoff up to the repository's max_attempts",
            )
        return StorageError(f"{action} '{key}' in {where} failed: {_reason(err)}")

    def locked(self, key: str, head: dict[str, Any]) -> ObjectLocked | None:
        """Why the object `head` describes cannot be deleted yet, or None if no lock holds it."""
        until = head.get("ObjectLockRetainUntilDate")
        mode = head.get("ObjectLockMode")
        if head.get("ObjectLockLegalHoldStatus") == "ON":
            return ObjectLocked(
                f"object '{key}' in {self.where()} is under an Object Lock legal hold and cannot"
                " be deleted",
                hint="someone placed a legal hold on it; it stays until the hold is removed",
            )
        if isinstance(until, datetime) and until > datetime.now(UTC):
            return ObjectLocked(
                f"object '{key}' in {self.where()} is protected by Object Lock ({mode}) until"
                f" {until.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC and cannot be deleted before then",
                hint="retention comes from the repository's object_lock setting; prune skips"
                " locked objects and removes them once their retention has passed",
                until=until,
            )
        return None

    def exists(self, key: str) -> ObjectExists:
        return ObjectExists(f"object '{key}' already exists in repository '{self._name}'")

    def not_found(self, key: str) -> ObjectNotFound:
        return ObjectNotFound(f"object '{key}' not found in repository '{self._name}'")

    def changed(self, key: str) -> StorageError:
        return StorageError(
            f"object '{key}' in {self.where()} was replaced while being read",
            hint="objects are write-once: something outside drkit deleted and rewrote it",
        )

    def damaged(self, key: str, detail: str) -> IntegrityError:
        return IntegrityError(
            f"object '{key}' in {self.where()} is damaged: {detail}",
            hint="read it from another copy (restore falls back to the next repository) and"
            " check who can write to the bucket; 'drkit verify' checks every object",
        )


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
