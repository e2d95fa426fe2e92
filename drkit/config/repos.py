"""Settings of the repositories: ``[[repo]]`` (posix or S3), ``[retention]`` and ``[copies]``.

drkit/config/settings.py assembles them with the other sections; import them from either.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    model_validator,
)

from drkit.config.durations import Duration


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RetentionSettings(_Section):
    """Which backups `drkit prune` keeps (docs/retention.md). Rules combine: a backup is kept when
    any rule keeps it, with every backup it needs; the newest backup is always kept."""

    full: int | None = Field(
        None, ge=1, description="the newest N full backups and their diff/incr"
    )
    window: Duration | None = Field(
        None, description="recovery window: every point in the last '30d' ('12h', '4w') restores"
    )
    daily: int | None = Field(None, ge=1, description="newest full backup of each of N days")
    weekly: int | None = Field(None, ge=1, description="newest full backup of each of N ISO weeks")
    monthly: int | None = Field(None, ge=1, description="newest full backup of each of N months")
    yearly: int | None = Field(None, ge=1, description="newest full backup of each of N years")

    @model_validator(mode="after")
    def _some_rule(self) -> RetentionSettings:
        if self.window is not None and self.window <= timedelta(0):
            raise ValueError("window must be longer than zero")
        if all(getattr(self, k) is None for k in type(self).model_fields):
            raise ValueError(
                "a retention section needs at least one rule: full, window, daily, weekly,"
                " monthly or yearly"
            )
        return self


class CopiesSettings(_Section):
    """What ``info`` expects of the copies (docs/operations.md, Copies)."""

    require_321: bool | None = Field(
        None,
        description="warn (info exit 102) when the newest backup lacks 3 copies on 2 media with"
        " 1 offsite; default: true when more than one repository is configured",
    )


class _RepoBase(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    media: str = "disk"
    offsite: bool = False
    retention: RetentionSettings | None = Field(
        None, description="this repository's retention (replaces the top-level [retention])"
    )


class PosixRepo(_RepoBase):
    type: Literal["posix"] = "posix"
    path: Path


class S3ObjectLock(_Section):
    mode: Literal["GOVERNANCE", "COMPLIANCE"]
    days: int = Field(ge=1, le=36500, description="retention from each object's write")


_MiB = 1024 * 1024
# Keys that would put a credential into drkit's configuration: refused with a pointer to the chain.
_CREDENTIAL_KEYS = frozenset(
    {
        "access_key",
        "access_key_id",
        "aws_access_key_id",
        "secret_key",
        "secret_access_key",
        "aws_secret_access_key",
        "session_token",
        "aws_session_token",
    }
)


class S3Repo(_RepoBase):
    """An S3 bucket + prefix (docs/s3.md). Credentials come from the AWS chain, never from here."""

    type: Literal["s3"]
    media: str = "object-storage"
    bucket: str = Field(min_length=3, max_length=63)
    prefix: str = ""
    region: str | None = None
    endpoint_url: str | None = Field(None, description="MinIO, Ceph RGW, ... (default: AWS)")
    force_path_style: bool | None = Field(None, description="default: true with endpoint_url")
    profile: str | None = Field(None, description="named profile of the shared AWS config")
    storage_class: str | None = None
    sse: Literal["AES256", "aws:kms"] | None = None
    sse_kms_key_id: str | None = None
    object_lock: S3ObjectLock | None = None
    multipart_threshold: int = Field(16 * _MiB, ge=0, le=5 * 1024 * _MiB)
    part_size: int = Field(16 * _MiB, ge=5 * _MiB, le=5 * 1024 * _MiB)
    max_concurrency: int = Field(4, ge=1, le=64, description="parallel parts per transfer")
    max_attempts: int = Field(5, ge=1, le=20, description="attempts per request")
    connect_timeout: float = Field(10, gt=0)
    read_timeout: float = Field(60, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data: Any) -> Any:
        if isinstance(data, dict):
            found = sorted(k for k in data if str(k).lower() in _CREDENTIAL_KEYS)
            if found:
                raise ValueError(
                    f"{', '.join(found)}: drkit never reads S3 credentials from its configuration;"
                    " use the AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or"
                    " 'profile', web identity / IRSA, instance role), see docs/s3.md"
                )
        return data

    @model_validator(mode="after")
    def _consistent(self) -> S3Repo:
        if self.sse_kms_key_id and self.sse != "aws:kms":
            raise ValueError("sse_kms_key_id needs sse = 'aws:kms'")
        if self.storage_class and self.storage_class.upper() in ("GLACIER", "DEEP_ARCHIVE"):
            raise ValueError(
                f"storage_class '{self.storage_class}' cannot be read without a restore request;"
                " drkit reads objects back (verify, restore, drills): use GLACIER_IR or STANDARD_IA"
            )
        return self


def _repo_type(value: Any) -> str:
    kind = value.get("type", "posix") if isinstance(value, dict) else getattr(value, "type", None)
    return str(kind or "posix")


# One entry of [[repo]]: the `type` key picks the model (posix when it is missing).
RepoSettings = Annotated[
    Annotated[PosixRepo, Tag("posix")] | Annotated[S3Repo, Tag("s3")],
    Discriminator(_repo_type),
]
