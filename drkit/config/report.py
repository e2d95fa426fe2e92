"""``[report]`` settings (docs/reports.md): the drill cadence the quarterly report checks."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# How often a kind of drill is due: once per calendar month, quarter, half year or year; "never"
# leaves that kind out of the cadence check.
Cadence = Literal["monthly", "quarterly", "half-yearly", "yearly", "never"]


class CadencePolicy(BaseModel):
    """One cadence per drill kind. A drill of a more thorough kind also counts for the lighter
    ones (a full drill restores, so it is a restore test too)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    restore_test: Cadence = Field("monthly", alias="restore-test")
    partial: Cadence = "quarterly"
    full: Cadence = "half-yearly"


class ReportSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: Path | None = Field(
        None,
        description="directory drkit report writes into when --out is not given (default: the"
        " current directory); the scheduler's report job writes into [schedule] report_dir",
    )
    cadence: CadencePolicy = Field(
        default_factory=lambda: CadencePolicy.model_validate({}),
        description="how often each kind of drill is due: monthly, quarterly, half-yearly,"
        " yearly or never",
    )
