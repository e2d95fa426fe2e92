"""Drill scenarios: which copies survive a disaster, what to restore, what to check, the targets.

A scenario is a TOML file (``runbooks/<name>.toml``) beside a Markdown runbook for the people who
would carry it out. ``[drill]`` in drkit.toml holds the defaults (targets, checks); a scenario
overrides them. Validated with pydantic; errors name the field.
"""

from __future__ import annotations

import hashlib
import tomllib
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from drkit.config.drill import Checks
from drkit.config.durations import Duration
from drkit.errors import ConfigError
from drkit.repo.drills import DrillKind


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Survivors(_Strict):
    """Which repositories the disaster leaves: all of them by default."""

    repos: list[str] = Field(default_factory=list)  # by name; empty: every configured one
    offsite_only: bool = False  # site-loss: only repositories marked offsite
    object_lock_only: bool = False  # ransomware: only S3 repositories under Object Lock
    vault: bool = True  # key-loss: false means Vault is gone, restore with the escrow key
    recovery_key: Path | None = None  # the escrow private key file, when vault = false


class RestorePointSpec(_Strict):
    """What to restore; at most one of time/lsn/xid/name/immediate/latest. Default: the newest
    backup and every archived WAL segment (latest)."""

    backup: str | None = None  # a label or 'latest'
    random: bool = False  # a random backup (and, with the archive, a random time after it)
    time: datetime | None = None
    lsn: str | None = None
    xid: str | None = None
    name: str | None = None
    immediate: bool = False
    latest: bool = False

    @model_validator(mode="after")
    def _one_target(self) -> RestorePointSpec:
        given = [k for k in ("time", "lsn", "xid", "name") if getattr(self, k) is not None] + [
            k for k in ("immediate", "latest", "random") if getattr(self, k)
        ]
        if len(given) > 1:
            raise ValueError(f"give at most one restore target, got {', '.join(given)}")
        if self.time is not None and self.time.tzinfo is None:
            raise ValueError("time needs a time zone, e.g. 2026-12-01T10:00:00+00:00")
        return self


class Targets(_Strict):
    rto: Duration | None = None
    rpo: Duration | None = None


class Scenario(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    kind: DrillKind = DrillKind.PARTIAL
    description: str = ""
    disaster_time: datetime | None = None  # losses are counted from here (default: drill start)
    survivors: Survivors = Survivors()
    restore: RestorePointSpec = RestorePointSpec()
    targets: Targets = Targets()
    checks: Checks | None = None  # None: the [drill] checks of drkit.toml
    runbook: str | None = None  # the Markdown runbook beside it, for people
    digest: str = ""  # sha256 of the file, set by load_scenario


def load_scenario(path: Path) -> Scenario:
    """Read and validate a scenario file; ConfigError with one line per invalid field."""
    try:
        raw = path.read_bytes()
        data = tomllib.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read scenario '{path}': {exc}") from None
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as exc:
        lines = [f"invalid scenario '{path}':"]
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(root)"
            lines.append(f"  {where}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
    return scenario.model_copy(update={"digest": hashlib.sha256(raw).hexdigest()})
