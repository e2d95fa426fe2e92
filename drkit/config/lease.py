"""``[lease]`` settings: who this host is and how long its leases in a repository last
(docs/reliability.md, "Two hosts, one repository")."""

from __future__ import annotations

import socket
from datetime import timedelta

from pydantic import BaseModel, ConfigDict, Field, model_validator

from drkit.config.durations import Duration


class LeaseSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        max_length=255,
        description="this host's name in lease records (default: the host name); every host"
        " that writes to a repository needs its own",
    )
    ttl: Duration = Field(
        timedelta(minutes=5),
        description="how long a lease lasts without renewal; a running operation renews it every"
        " third of this",
    )
    grace: Duration = Field(
        timedelta(seconds=30),
        description="how long past its expiry another host still respects a lease: more than"
        " the clock difference between the hosts",
    )
    leftover_age: Duration = Field(
        timedelta(hours=1),
        description="after taking over an expired lease of another host, incomplete backups"
        " younger than this are left for a later run",
    )

    @model_validator(mode="after")
    def _positive(self) -> LeaseSettings:
        if self.ttl <= timedelta(0) or self.grace < timedelta(0):
            raise ValueError("lease ttl must be positive and grace must not be negative")
        if any(c in self.host for c in "/\\\0"):
            raise ValueError(f"lease host '{self.host}' must not contain '/', '\\' or NUL")
        return self
