"""What an S3 repository is configured with, checked on construction, and the limits S3 sets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from drkit.storage.base import validate_key

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PART_SIZE = 5 * 1024 * MiB
MAX_PARTS = 10_000
MAX_SINGLE_PUT = 5 * 1024 * MiB
DEFAULT_PART_SIZE = 16 * MiB

# Storage classes whose objects cannot be read without a restore request: drkit must be able to
# read every object back (verify, restore, drills), so these are refused.
UNREADABLE_STORAGE_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE"})


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
