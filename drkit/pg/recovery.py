"""Settings for a restored cluster: archive_mode, recovery targets, restore_command,
recovery.signal, or a standby's primary_conninfo and standby.signal."""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from drkit.errors import ConfigError, UnsafeManifest

AUTO_CONF = "postgresql.auto.conf"


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


@dataclass(frozen=True)
class Standby:
    """A restored cluster that stays in recovery and follows a primary: by streaming from
    ``primary_conninfo`` (when given) and by fetching archived WAL with the restore_command."""

    primary_conninfo: str = ""


def check_primary_conninfo(conninfo: str) -> None:
    """ConfigError for a conninfo libpq cannot parse or one that holds a password: it came
    from the command line (visible to every local user in the process list) and would be
    written into postgresql.auto.conf, which every backup of the standby copies."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(conninfo)
    except ProgrammingError as exc:
        raise ConfigError(f"invalid --primary-conninfo: {exc}") from None
    if params.get("password"):
        raise ConfigError(
            "--primary-conninfo holds a password: drkit keeps passwords out of its command line"
            " and out of the restored configuration",
            hint="give the replication user's password in the standby user's ~/.pgpass (or"
            " passfile=FILE in the conninfo)",
        )


def write_restore_settings(
    pgdata_fd: int,
    *,
    archive_off: bool,
    restore_command: str,
    target: RecoveryTarget | None,
    standby: Standby | None = None,
    recovery_end_command: str = "",
    init_sync: bool = False,
) -> None:
    """Append a restored cluster's settings to its postgresql.auto.conf (read last, so they win
    over postgresql.conf): ``archive_mode = off`` when ``archive_off`` (a copy must not archive
    into its source's repository), and with a ``target`` the recovery settings, plus
    recovery.signal, which makes PostgreSQL run targeted archive recovery instead of plain crash
    recovery. A ``standby`` gets restore_command, primary_conninfo and standby.signal instead
    (it stays in recovery, following the newest timeline, until promoted). With ``init_sync``
    (PostgreSQL 14+ on Linux, restored and synced by drkit), ``recovery_init_sync_method =
    syncfs`` unless the restored configuration sets it: a restored cluster starts with a sync
    of its data directory, which by default opens and fsyncs every file, one at a time (~95 s
    for 100,000 relations measured), where syncfs takes one call per file system. Both files
    are opened in ``pgdata_fd`` without following links: a restored postgresql.auto.conf that
    is a link is refused, never written through."""
    settings = {"archive_mode": "off"} if archive_off else {}
    if init_sync and not _sets(pgdata_fd, "recovery_init_sync_method"):
        settings["recovery_init_sync_method"] = "syncfs"
    if target is not None:
        settings |= {"restore_command": restore_command, **target.settings()}
    if standby is not None:
        settings |= {"restore_command": restore_command, "recovery_target_timeline": "latest"}
        if standby.primary_conninfo:
            settings["primary_conninfo"] = standby.primary_conninfo
    if (target is not None or standby is not None) and recovery_end_command:
        settings["recovery_end_command"] = recovery_end_command
    if not settings:
        return
    lines = ["", "# added by drkit restore"]
    lines += [f"{name} = '{_quote(value)}'" for name, value in settings.items()]
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(AUTO_CONF, flags, 0o600, dir_fd=pgdata_fd)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise UnsafeManifest(
            f"the restored '{AUTO_CONF}' is a symbolic link: drkit does not write through it",
            hint="the backup holds a link where PostgreSQL keeps a file; restore another backup",
        ) from None
    with open(fd, "a", encoding="utf-8") as conf:
        conf.write("\n".join(lines) + "\n")
    if target is not None or standby is not None:
        signal = "standby.signal" if standby is not None else "recovery.signal"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        os.close(os.open(signal, flags, 0o600, dir_fd=pgdata_fd))


def _sets(pgdata_fd: int, name: str) -> bool:
    """Whether postgresql.conf or postgresql.auto.conf (not their includes) sets ``name``."""
    pattern = re.compile(rf"^\s*{name}\s*=", re.MULTILINE | re.IGNORECASE)
    for conf in ("postgresql.conf", AUTO_CONF):
        try:
            fd = os.open(conf, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pgdata_fd)
        except OSError:
            continue  # missing, or a link (refused when written)
        with open(fd, encoding="utf-8", errors="replace") as file:
            if pattern.search(file.read()):
                return True
    return False


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "''")
