"""drkit restore: restore a backup into an empty directory."""

from __future__ import annotations

import shlex
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from drkit.cli.common import (
    ConfigOption,
    JsonOption,
    RecoveryKeyOption,
    handle_errors,
    human_size,
    print_json,
    progress,
    settings_from,
    stdout,
    warn,
)
from drkit.config.settings import config_path
from drkit.errors import ConfigError
from drkit.pg.recovery import RecoveryTarget, TargetAction, TargetKind
from drkit.pg.wal import parse_lsn


class ArchiveMode(StrEnum):
    OFF = "off"
    PRESERVE = "preserve"


def wal_fetch_command(config: Path, recovery_key: Path | None) -> str:
    """The restore_command a restored cluster uses to fetch WAL from the repositories."""
    drkit = Path(sys.executable).parent / "drkit"
    command = f"{shlex.quote(str(drkit))} wal-fetch --config {shlex.quote(str(config))}"
    if recovery_key is not None:
        command += f" --recovery-key {shlex.quote(str(recovery_key.absolute()))}"
    return command + " %f %p"


def _check_target(target: RecoveryTarget) -> None:
    try:
        if target.kind is TargetKind.TIME:
            _ = target.time
        elif target.kind is TargetKind.LSN:
            parse_lsn(target.value)
        elif target.kind is TargetKind.XID:
            int(target.value)
    except ValueError as exc:
        raise ConfigError(
            f"invalid recovery target {target.kind} '{target.value}': {exc}"
        ) from None


def _parse_map(values: list[str]) -> dict[str, Path]:
    mapping: dict[str, Path] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or not name or not directory:
            raise ConfigError(f"--tablespace-map '{value}' is not OID=DIR or NAME=DIR")
        mapping[name] = Path(directory)
    return mapping


@handle_errors
def command(
    pgdata: Annotated[Path, typer.Option(help="empty directory to restore into")],
    config: ConfigOption = None,
    backup: Annotated[str | None, typer.Option(help="backup label, or 'latest'")] = None,
    repo: Annotated[str | None, typer.Option(help="repository to restore from")] = None,
    tablespace_map: Annotated[
        list[str] | None,
        typer.Option(
            "--tablespace-map", help="restore a tablespace elsewhere: OID=DIR or NAME=DIR"
        ),
    ] = None,
    tablespace_map_all: Annotated[
        bool,
        typer.Option(
            "--tablespace-map-all",
            help="restore tablespaces not in --tablespace-map where the backup says they were",
        ),
    ] = False,
    archive_mode: Annotated[
        ArchiveMode,
        typer.Option(
            help="'off': the copy never archives (default); 'preserve': keep the source's"
            " archive_mode, for a real failover"
        ),
    ] = ArchiveMode.OFF,
    process_max: Annotated[int | None, typer.Option(help="parallel workers")] = None,
    recovery_key: RecoveryKeyOption = None,
    target_time: Annotated[
        str | None, typer.Option(help="recover to this time, e.g. '2026-11-27 10:15:00+00'")
    ] = None,
    target_lsn: Annotated[str | None, typer.Option(help="recover to this WAL position")] = None,
    target_xid: Annotated[str | None, typer.Option(help="recover to this transaction")] = None,
    target_name: Annotated[
        str | None, typer.Option(help="recover to this pg_create_restore_point() name")
    ] = None,
    target_latest: Annotated[
        bool, typer.Option("--target-latest", help="replay every archived WAL segment")
    ] = False,
    target_immediate: Annotated[
        bool, typer.Option("--target-immediate", help="stop as soon as the backup is consistent")
    ] = False,
    target_action: Annotated[
        TargetAction, typer.Option(help="what to do when the target is reached")
    ] = TargetAction.PROMOTE,
    target_timeline: Annotated[
        str, typer.Option(help="'latest', 'current' or a timeline number")
    ] = "latest",
    target_exclusive: Annotated[
        bool, typer.Option("--target-exclusive", help="stop just before the target")
    ] = False,
    json_: JsonOption = False,
) -> None:
    """Restore a backup into an empty directory and print how to start it.

    Without a target the restored cluster replays the WAL stored with the backup and opens at
    the backup's consistent point. With a --target-* option it replays archived WAL (fetched by
    'drkit wal-fetch') up to that point; without --backup the newest backup before the target is
    used.
    """
    from drkit.restore.operation import RestoreOperation, RestoreRequest

    settings = settings_from(
        config, {"backup": {"process_max": process_max}, "keys": {"recovery_key": recovery_key}}
    )
    chosen = {
        TargetKind.TIME: target_time,
        TargetKind.LSN: target_lsn,
        TargetKind.XID: target_xid,
        TargetKind.NAME: target_name,
        TargetKind.LATEST: "latest" if target_latest else None,
        TargetKind.IMMEDIATE: "immediate" if target_immediate else None,
    }
    given = [(kind, value) for kind, value in chosen.items() if value is not None]
    if len(given) > 1:
        raise ConfigError("give at most one recovery target (--target-time, --target-lsn, ...)")
    target = None
    if given:
        kind, value = given[0]
        target = RecoveryTarget(
            kind, value, target_action, target_timeline, inclusive=not target_exclusive
        )
        _check_target(target)
    request = RestoreRequest(
        pgdata=pgdata,
        backup=backup,
        repo=repo,
        tablespace_map=_parse_map(tablespace_map or []),
        target=target,
        restore_command=wal_fetch_command(config_path(config), recovery_key),
        tablespace_map_all=tablespace_map_all,
        archive_mode=archive_mode.value,
    )
    result = RestoreOperation(settings, request, progress()).run()
    for event in result.fallbacks:
        warn(event)
    if json_:
        print_json(
            {
                "label": result.label,
                "pgdata": str(result.pgdata),
                "files": result.files,
                "size": result.size,
                "tablespaces": {str(k): str(v) for k, v in result.tablespaces.items()},
                "start_command": result.start_command,
                "repo": result.repo,
                "fallbacks": result.fallbacks,
            }
        )
        return
    stdout.print(
        f"restored backup {result.label} from '{result.repo}' to '{result.pgdata}':"
        f" {result.files} files,"
        f" {human_size(result.size)}, every checksum verified"
    )
    for oid, directory in result.tablespaces.items():
        stdout.print(f"  tablespace {oid} -> '{directory}'")
    if result.target is not None:
        stdout.print(
            f"recovery target: {result.target.kind} {result.target.value}".rstrip()
            + f" (then {result.target.action}); WAL comes from 'drkit wal-fetch'"
        )
    if archive_mode is ArchiveMode.OFF:
        stdout.print(
            "archive_mode = off in postgresql.auto.conf: this copy never archives into the"
            " repository (--archive-mode preserve keeps the source's setting, for a failover)"
        )
    stdout.print("next: start the restored cluster (it replays the backup's WAL, then opens):")
    stdout.print(f"  {result.start_command}", markup=False)
