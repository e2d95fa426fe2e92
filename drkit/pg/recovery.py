"""Recovery settings for a restored cluster: targets, restore_command, recovery.signal."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path


class TargetKind(StrEnum):
    TIME = "time"
    LSN = "lsn"
    XID = "xid"
    NAME = "name"
    IMMEDIATE = "immediate"  # stop as soon as the backup is consistent
    LATEST = "latest"  # replay every archived WAL


class TargetAction(StrEnum):
    PROMOTE = "promote"
    PAUSE = "pause"
    SHUTDOWN = "shutdown"


@dataclass(frozen=True)
class RecoveryTarget:
    kind: TargetKind
    value: str = ""  # the time, LSN, XID or restore point name
    action: TargetAction = TargetAction.PROMOTE
    timeline: str = "latest"  # 'latest', 'current' or a timeline number
    inclusive: bool = True

    @property
    def time(self) -> datetime:
        parsed = datetime.fromisoformat(self.value)
        if parsed.tzinfo is None:
            raise ValueError(f"target time '{self.value}' needs a time zone, e.g. +00")
        return parsed

    def settings(self) -> dict[str, str]:
        """The recovery_target_* settings for this target."""
        values = {
            "recovery_target_timeline": self.timeline,
            "recovery_target_action": self.action.value,
        }
        if self.kind is TargetKind.LATEST:
            return {"recovery_target_timeline": self.timeline}
        if self.kind is TargetKind.IMMEDIATE:
            values["recovery_target"] = "immediate"
        else:
            values[f"recovery_target_{self.kind.value}"] = self.value
            values["recovery_target_inclusive"] = "on" if self.inclusive else "off"
        return values


def write_recovery_config(pgdata: Path, restore_command: str, target: RecoveryTarget) -> None:
    """Append the settings to postgresql.auto.conf (later lines win) and create recovery.signal,
    which makes PostgreSQL run targeted archive recovery instead of plain crash recovery."""
    settings = {"restore_command": restore_command, **target.settings()}
    lines = ["", "# added by drkit restore"]
    lines += [f"{name} = '{_quote(value)}'" for name, value in settings.items()]
    with open(pgdata / "postgresql.auto.conf", "a", encoding="utf-8") as conf:
        conf.write("\n".join(lines) + "\n")
    fd = os.open(pgdata / "recovery.signal", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "''")
