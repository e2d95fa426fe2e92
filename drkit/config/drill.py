"""``[drill]`` and ``[heartbeat]`` settings (docs/drills.md); scenarios reuse the checks model."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from drkit.config.durations import Duration


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SqlCheck(_Section):
    """A query whose first column of the first row is compared: equal to ``expect`` (as text),
    at least ``min``, at most ``max``; or, with ``max_ms``, timed (best of ``repeat`` runs)."""

    name: str
    query: str
    database: str = "postgres"
    expect: str | None = None
    min: float | None = None
    max: float | None = None
    max_ms: float | None = None
    repeat: int = Field(3, ge=1, le=100)


class PgbenchCheck(_Section):
    """A short read-only pgbench run against the restored copy: the built-in select-only script
    (``pgbench -S``, which needs pgbench's tables) or ``script``; FAIL below ``min_tps``."""

    min_tps: float = Field(gt=0, description="the floor: fewer transactions per second FAIL")
    clients: int = Field(2, ge=1, le=1000)
    seconds: int = Field(10, ge=1, le=3600)
    database: str = "postgres"
    script: Path | None = None  # a read-only SQL script (pgbench -f) instead of -S


class Checks(_Section):
    amcheck: bool = Field(True, description="heap and btree checks of every (or listed) database")
    amcheck_databases: list[str] = Field(default_factory=list)  # empty: every database
    heapallindexed: bool = False
    readable: bool = Field(False, description="read every table once (a count per table)")
    heartbeat: bool = Field(
        True, description="the heartbeat row, when the source has one, within the RPO target"
    )
    sql: list[SqlCheck] = Field(default_factory=list)
    pgbench: PgbenchCheck | None = None


class DrillSettings(_Section):
    rto: Duration = Field(timedelta(hours=4), description="recovery time objective")
    rpo: Duration = Field(timedelta(hours=1), description="recovery point objective")
    sandbox: Path = Field(
        Path("/var/lib/drkit/drill"),
        description="parent directory of drill sandboxes; never inside PGDATA",
    )
    reuse_sandbox: bool = Field(
        False,
        description="keep one sandbox between drills and restore into it by delta, writing"
        " only what changed since the last drill (a drill with --keep still gets its own)",
    )
    timeout: Duration = Field(
        timedelta(hours=2), description="give up when recovery has not ended within this"
    )
    checks: Checks = Checks()


class HeartbeatSettings(_Section):
    database: str = "postgres"
    table: str = Field("drkit_heartbeat", pattern=r"^[a-z_][a-z0-9_]*$")
    interval: Duration = Field(timedelta(seconds=10))
