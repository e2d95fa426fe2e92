"""drkit restore: restore a backup into an empty directory (or over a stale one, --delta)."""

from __future__ import annotations

from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

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
    stopped_by_signals,
    warn_all,
)
from drkit.errors import DrkitError
from drkit.interrupts import Interrupted
from drkit.pg.recovery import Standby, TargetAction

if TYPE_CHECKING:
    from drkit.config.settings import Settings
    from drkit.restore.operation import RestoreResult
    from drkit.restore.request import RestoreRequest


class ArchiveMode(StrEnum):
    OFF = "off"
    PRESERVE = "preserve"


class RestoreType(StrEnum):
    COPY = "copy"  # opens at the backup's end, or recovers to a --target-*
    STANDBY = "standby"  # stays in recovery, following a primary


@handle_errors
def command(
    pgdata: Annotated[
        Path | None,
        typer.Option(
            help="empty directory to restore into (with --delta: a stopped data directory)",
            show_default=False,
        ),
    ] = None,
    delta: Annotated[
        bool,
        typer.Option(
            "--delta",
            help="restore over an existing, stopped data directory: write only the files that"
            " differ from the backup, remove those it does not have",
        ),
    ] = False,
    trust_timestamps: Annotated[
        bool,
        typer.Option(
            "--trust-timestamps",
            help="with --delta: keep a file whose size and mtime are the backup's without"
            " reading it (faster; a file changed without a new mtime stays as it is)",
        ),
    ] = False,
    plan: Annotated[
        bool,
        typer.Option(
            "--plan",
            help="write nothing: print the chain, the WAL range, the bytes to fetch and the"
            " expected duration (from past drills)",
        ),
    ] = False,
    config: ConfigOption = None,
    backup: Annotated[str | None, typer.Option(help="backup label, or 'latest'")] = None,
    repo: Annotated[
        str | None,
        typer.Option(
            help="repository to restore from (tried first for the backup; the restored"
            " cluster's restore_command fetches WAL from it alone)"
        ),
    ] = None,
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
    restore_type: Annotated[
        RestoreType,
        typer.Option(
            "--type",
            help="'copy': a cluster that opens (default); 'standby': standby.signal and"
            " primary_conninfo, it follows the primary until promoted",
        ),
    ] = RestoreType.COPY,
    primary_conninfo: Annotated[
        str | None,
        typer.Option(
            metavar="CONNINFO",
            help="with --type standby: where it streams from, e.g. 'host=db1 user=replicator'"
            " (no password: ~/.pgpass)",
        ),
    ] = None,
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

    With --delta, bring an existing data directory (a failed primary, a lagging standby, a kept
    drill sandbox; stopped) to the backup instead: files whose size or checksum differ are
    written again, files the backup does not have are removed, the rest is kept. Add
    --trust-timestamps to keep files whose size and mtime are the backup's without reading them.

    Without a target the restored cluster replays the WAL stored with the backup and opens at
    the backup's consistent point. With a --target-* option it replays archived WAL (fetched by
    'drkit wal-fetch') up to that point; without --backup the newest backup before the target is
    used.
    """
    from drkit.restore.operation import restore_backup
    from drkit.restore.request import RestoreRequest, parse_tablespace_map, recovery_target

    if pgdata is None and not plan:
        raise typer.BadParameter("give --pgdata DIR (or --plan to only plan the restore)")
    if trust_timestamps and not delta:
        raise typer.BadParameter("--trust-timestamps goes with --delta")
    if primary_conninfo is not None and restore_type is not RestoreType.STANDBY:
        raise typer.BadParameter("--primary-conninfo goes with --type standby")
    settings = settings_from(
        config, {"backup": {"process_max": process_max}, "keys": {"recovery_key": recovery_key}}
    )
    request = RestoreRequest(
        pgdata=pgdata or Path(),
        backup=backup,
        repo=repo,
        tablespace_map=parse_tablespace_map(tablespace_map or []),
        target=recovery_target(
            time=target_time,
            lsn=target_lsn,
            xid=target_xid,
            name=target_name,
            latest=target_latest,
            immediate=target_immediate,
            action=target_action,
            timeline=target_timeline,
            exclusive=target_exclusive,
        ),
        config=config,
        tablespace_map_all=tablespace_map_all,
        archive_mode=archive_mode.value,
        delta=delta,
        trust_timestamps=trust_timestamps,
        standby=Standby(primary_conninfo or "") if restore_type is RestoreType.STANDBY else None,
    )
    with stopped_by_signals(partial(_interrupted, delta)):
        if plan:
            _render_plan(settings, request, json_)
        result = restore_backup(settings, request, progress())
    warn_all(result.warnings)
    if json_:
        print_json(result.as_dict())
        raise typer.Exit(result.exit_code)
    trusted = result.delta.trusted if result.delta is not None else 0
    stdout.print(
        f"restored backup {result.label} from '{result.repo}' to '{result.pgdata}':"
        f" {result.files} files,"
        f" {human_size(result.size)}, "
        + ("every checksum verified" if not trusted else "every file read or written verified")
    )
    if result.delta is not None:
        changed = result.delta
        stdout.print(
            f"delta: {changed.rewritten} files rewritten, {changed.patched} rewritten in part,"
            f" {changed.removed} removed, {changed.unchanged} unchanged;"
            f" {human_size(changed.written)} written"
        )
        if trusted:
            origin = f", restored from {changed.origin} before" if changed.origin else ""
            stdout.print(
                f"trusted timestamps: {trusted} files kept on their size and mtime, not read"
                + origin
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
    stdout.print(f"next: start the restored cluster ({_what_recovery_does(result)}):")
    stdout.print(f"  {result.start_command}", markup=False)
    raise typer.Exit(result.exit_code)


def _interrupted(delta: bool, exc: Interrupted) -> DrkitError:
    return DrkitError(
        f"restore interrupted by {exc.signal}: {exc.left_behind or 'nothing was written'}",
        hint="run the same restore --delta again: it writes only what still differs"
        if delta
        else "run the restore again",
    )


def _what_recovery_does(result: RestoreResult) -> str:
    if result.standby:
        return (
            "a standby: it replays the backup's WAL, then follows the primary, streaming and"
            " fetching archived WAL with 'drkit wal-fetch', until promoted"
        )
    target = result.target
    if target is None:
        return "it replays the backup's WAL, then opens"
    if target.kind.value == "latest":
        return "it replays every archived WAL segment, then opens on a new timeline"
    then = {
        "promote": "then opens on a new timeline",
        "pause": "then pauses, read-only, until pg_wal_replay_resume() promotes it",
        "shutdown": "then shuts down",
    }[target.action.value]
    return f"it replays archived WAL up to the target, {then}"


def _render_plan(settings: Settings, request: RestoreRequest, json_: bool) -> NoReturn:
    from drkit.config.durations import format_duration
    from drkit.restore.plan import plan_restore

    plan = plan_restore(settings, request)
    warn_all(plan.warnings)
    if json_:
        print_json(plan.as_dict())
        raise typer.Exit(plan.exit_code)
    say = stdout.print
    say(f"restore plan: backup {plan.label} from '{plan.repo}' (nothing written)", markup=False)
    say(f"  chain: {' -> '.join(plan.chain)}", markup=False)
    if plan.target is not None:
        say(f"  target: {plan.target.kind} {plan.target.value}".rstrip(), markup=False)
    wal = plan.wal
    source = (
        f"{wal.fetched} segments fetched from the archive"
        + (" at most (the target may be reached sooner)" if wal.upper_bound else "")
        if wal.fetched
        else "stored with the backup, nothing from the archive"
    )
    say(f"  WAL: {wal.first} .. {wal.last} ({source})", markup=False)
    say(
        f"  fetch: {human_size(plan.fetch_bytes)} ({plan.fetch_bytes} bytes stored);"
        f" write: {human_size(plan.restore_bytes)} in {plan.files} files",
        markup=False,
    )
    prediction = plan.prediction
    if prediction is None:
        say(
            "  expected duration: unknown, no drill has restored a copy yet (run 'drkit drill')",
            markup=False,
        )
    else:
        rates = prediction.rates
        where = f" from '{rates.repository}'" if rates.repository else ""
        say(
            f"  expected duration: {format_duration(prediction.seconds)} (restore"
            f" {format_duration(prediction.restore_seconds)}, start and WAL replay"
            f" {format_duration(prediction.replay_seconds)}), based on {rates.drills}"
            f" drill{'s' if rates.drills != 1 else ''}{where}:"
            f" {human_size(rates.bytes_per_second)}/s,"
            f" {rates.start_seconds:.2f}s start + {rates.seconds_per_segment:.2f}s per WAL"
            " segment",
            markup=False,
        )
    if plan.unreadable_drills:
        say(f"  {plan.unreadable_drills} drill records fail authentication: not used", markup=False)
    raise typer.Exit(plan.exit_code)
