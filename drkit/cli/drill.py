"""drkit drill: restore drills; ``drkit drill list`` shows the recorded ones.

``drkit drill [options]`` runs a drill (the sub-app's callback, run when no subcommand is given);
``drkit drill list`` lists the recorded ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from drkit.cli import drill_notes
from drkit.cli.common import (
    ConfigOption,
    JsonOption,
    RecoveryKeyOption,
    handle_errors,
    objective_text,
    print_json,
    progress,
    settings_from,
    stdout,
    warn,
    warn_all,
)

if TYPE_CHECKING:
    from datetime import timedelta

    from drkit.drill.records import ListedDrill
    from drkit.repo.drills import DrillRecord

app = typer.Typer(
    help="Restore drills: prove a backup restores, measure RTO and RPO, keep the record."
    " Without a command: run a drill (exit 0 PASS, 30 restore failed, 31 check failed, 32 RTO"
    " or RPO target missed).",
)

COLUMNS = ("ID", "STARTED", "KIND", "SCENARIO", "BACKUP", "REPOSITORY", "RTO", "RPO", "RESULT")


def _duration(value: str | None) -> timedelta | None:
    from drkit.config.durations import parse_duration

    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.callback(invoke_without_command=True)
@handle_errors
def command(
    ctx: typer.Context,
    config: ConfigOption = None,
    scenario: Annotated[
        Path | None, typer.Option(help="a scenario file (runbooks/*.toml)", show_default=False)
    ] = None,
    backup: Annotated[
        str | None, typer.Option(help="restore this backup (label or 'latest') to its end")
    ] = None,
    target_time: Annotated[
        str | None, typer.Option(help="recover to this time (with a time zone)")
    ] = None,
    target_name: Annotated[str | None, typer.Option(help="recover to this restore point")] = None,
    target_lsn: Annotated[str | None, typer.Option(help="recover to this LSN")] = None,
    target_xid: Annotated[str | None, typer.Option(help="recover to this transaction")] = None,
    random: Annotated[
        bool,
        typer.Option(
            "--random",
            help="a random backup, recovered to a random instant of the WAL archived after it",
        ),
    ] = False,
    rto: Annotated[
        str | None,
        typer.Option(help="RTO target, e.g. '4h' (default: rto of drkit.toml's drill section)"),
    ] = None,
    rpo: Annotated[
        str | None,
        typer.Option(help="RPO target, e.g. '1h' (default: rpo of drkit.toml's drill section)"),
    ] = None,
    keep: Annotated[
        bool, typer.Option("--keep", help="keep the sandbox for inspection (server stopped)")
    ] = False,
    started_by: Annotated[
        str | None,
        typer.Option(
            help="who started it, for the record: 'scheduler' from a timer or a CronJob"
            " (default: user:<login>)"
        ),
    ] = None,
    json_: JsonOption = False,
) -> None:
    """Run a restore drill: exit 0 PASS, 30 restore failed, 31 check failed, 32 RTO/RPO missed.

    Without options: the newest backup and every archived WAL segment, the checks and targets
    of [drill] in drkit.toml.
    """
    if ctx.invoked_subcommand is not None:
        return
    from drkit.config.settings import config_path
    from drkit.drill.operation import DrillOperation
    from drkit.drill.result import DrillRequest
    from drkit.drill.scenario import load_scenario
    from drkit.interrupts import Interrupted

    settings = settings_from(config)
    request = DrillRequest(
        scenario=load_scenario(scenario) if scenario is not None else None,
        backup=backup,
        target_time=target_time,
        target_name=target_name,
        target_lsn=target_lsn,
        target_xid=target_xid,
        random=random,
        rto=_duration(rto),
        rpo=_duration(rpo),
        keep=keep,
        config=config_path(config),
    )
    if started_by:
        request.started_by = started_by
    try:
        result = DrillOperation(settings, request, progress()).run()
    except Interrupted as exc:
        warn(f"drill interrupted by {exc.signal}: server stopped, sandbox removed")
        raise typer.Exit(exc.exit_code) from None
    warn_all(result.warnings)
    if json_:
        print_json(result.as_dict())
    else:
        _render(result.record, result.sandbox, result.written, result.queued, result.flushed)
    raise typer.Exit(result.exit_code)


def _render(
    record: DrillRecord,
    sandbox: Path | None,
    written: list[str],
    queued: Path | None = None,
    flushed: tuple[str, ...] | list[str] = (),
) -> None:
    from drkit.config.durations import format_duration

    def secs(value: float | None) -> str:
        return "-" if value is None else format_duration(value)

    say = stdout.print
    what = f"scenario '{record.scenario}' ({record.kind})" if record.scenario else str(record.kind)
    say(f"drill {record.id}: {what}", markup=False)
    point = record.restore_point
    if point is not None:
        target = point.target_kind + (f" '{point.target_value}'" if point.target_value else "")
        say(f"restore point: backup {point.backup}, target {target}", markup=False)
        say(f"  why: {point.reason}", markup=False)
    if record.repositories_allowed:
        used = f", restored from '{record.repository}'" if record.repository else ""
        say(f"repositories: {', '.join(record.repositories_allowed)}{used}", markup=False)
    say("phases:", markup=False)
    for phase in record.phases:
        note = " (not part of the RTO)" if phase.name == "teardown" else ""
        detail = f"  {phase.detail}" if phase.detail else ""
        say(f"  {phase.name:<18} {phase.seconds:8.2f}s{detail}{note}", markup=False)
    for name, objective in (("RTO", record.rto), ("RPO", record.rpo)):
        verdict = {True: "met", False: "MISSED", None: "not measured"}[objective.met]
        say(
            f"{name} {secs(objective.achieved_seconds)} (target"
            f" {secs(objective.target_seconds)}): {verdict}",
            markup=False,
        )
    if record.predicted_seconds is not None:
        restored = sum(
            p.seconds for p in record.phases if p.name in ("restore", "wal-replay+start")
        )
        say(
            f"  predicted by 'restore --plan': {secs(record.predicted_seconds)} until promoted;"
            f" took {secs(restored)}",
            markup=False,
        )
    rpo = record.rpo_detail
    if rpo.recovered_time is not None:
        line = f"  recovered point {rpo.recovered_time.isoformat()} ({rpo.method})"
        if rpo.recovered_lsn:
            line += f", LSN {rpo.recovered_lsn}"
        if rpo.source_lsn is not None:
            line += f"; source at {rpo.source_lsn}, {rpo.lost_bytes} bytes of WAL behind"
        else:
            line += "; source not reachable"
        say(line, markup=False)
    for exp in record.exposure:
        if exp.error:
            say(f"  exposure '{exp.repo}': unknown ({exp.error})", markup=False)
            continue
        backup = f"{exp.newest_backup} ({secs(exp.newest_backup_age_seconds)} old)"
        wal = (
            f"{exp.newest_wal} ({secs(exp.newest_wal_age_seconds)} old)"
            if exp.newest_wal
            else "none"
        )
        say(f"  exposure '{exp.repo}': newest backup {backup}, newest WAL {wal}", markup=False)
    if record.checks:
        say("checks:", markup=False)
    for check in record.checks:
        state = "ok  " if check.ok else "FAIL"
        say(
            f"  {state} {check.name} ({check.kind}, {check.seconds:.2f}s): {check.detail}",
            markup=False,
        )
    if sandbox is not None:
        say(f"sandbox kept: {sandbox}", markup=False)
    if written:
        say(f"record written to: {', '.join(written)}", markup=False)
    if queued is not None:
        say(f"record queued on this host: {queued}", markup=False)
    if flushed:
        say(f"queued records of earlier drills written: {', '.join(flushed)}", markup=False)
    if record.failure is None:
        say("PASS", markup=False)
    else:
        say(f"FAIL ({record.failure}): {record.reason}", markup=False)


@app.command("list")
@handle_errors
def list_command(
    config: ConfigOption = None,
    repo: Annotated[
        str | None, typer.Option(help="read only this repository (default: every one)")
    ] = None,
    recovery_key: RecoveryKeyOption = None,
    json_: JsonOption = False,
) -> None:
    """List past drills from the repositories' records, oldest first, then the records queued
    on this host (QUEUED: no repository took them yet; the next drill writes them). RTO and RPO
    show achieved/target; a record that fails authentication is listed as UNAUTHENTIC (exit 1)."""
    from drkit.drill.records import DrillListOperation

    settings = settings_from(config, {"keys": {"recovery_key": recovery_key}})
    result = DrillListOperation(settings, repo).run()
    warn_all(result.warnings)
    if json_:
        print_json(result.as_dict())
        raise typer.Exit(result.exit_code)
    if not result.drills and not result.queued:
        stdout.print(f"no drill records in {', '.join(map(repr, result.repositories))}")
        raise typer.Exit(result.exit_code)
    rows = [COLUMNS, *(_row(d) for d in result.drills)]
    rows += [(*_row(d)[:-1], _row(d)[-1] + " QUEUED") for d in result.queued]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        stdout.print("  ".join([*cells, row[-1]]), markup=False)
    raise typer.Exit(result.exit_code)


def _row(drill: ListedDrill) -> tuple[str, ...]:
    record = drill.record
    if record is None:
        return (drill.id, *["-"] * 7, "UNAUTHENTIC")
    outcome = str(record.outcome)
    if record.failure is not None:
        outcome += f" ({record.failure})"
    return (
        drill.id,
        record.started_at.isoformat(timespec="seconds"),
        str(record.kind),
        record.scenario or "-",
        record.restore_point.backup if record.restore_point else "-",
        record.repository or "-",
        objective_text(**record.rto.model_dump()),
        objective_text(**record.rpo.model_dump()),
        outcome,
    )


drill_notes.register(app)  # drkit drill note / drkit drill signoff
