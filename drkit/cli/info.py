"""drkit info: the backups in a repository."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from drkit.cli.common import (
    ConfigOption,
    JsonOption,
    RecoveryKeyOption,
    handle_errors,
    human_size,
    objective_text,
    print_json,
    settings_from,
    stderr,
    stdout,
    warn_all,
)

if TYPE_CHECKING:
    from drkit.info.operation import RepositoryInfo


@handle_errors
def command(
    config: ConfigOption = None,
    repo: Annotated[str | None, typer.Option(help="repository to describe")] = None,
    recovery_key: RecoveryKeyOption = None,
    json_: JsonOption = False,
) -> None:
    """List the backups in the repository, its archived WAL and its copies (3-2-1)."""
    from drkit.info.operation import describe_repository

    settings = settings_from(config, {"keys": {"recovery_key": recovery_key}})
    info = describe_repository(settings, repo)
    if json_:
        print_json(info.as_dict())
    else:
        _render(info)
        warn_all(info.warnings)
    raise typer.Exit(info.exit_code)


def _render(info: RepositoryInfo) -> None:
    stdout.print(
        f"repository '{info.name}' (system {info.system_identifier}, format {info.format})"
    )
    stdout.print(f"status: {info.status}", markup=False)
    if info.running is not None:
        since = info.running.since.isoformat(timespec="seconds")
        progress = ""
        if info.running_label is not None:
            stored = human_size(info.running_stored)
            progress = f": {info.running_label}, {stored} stored so far"
        where = f" on host '{info.running.host}'" if info.running.host else ""
        stdout.print(
            f"backup running{where} since {since} (pid {info.running.pid}){progress}",
            markup=False,
        )
    if not info.backups:
        stdout.print("no backups yet")
    for b in info.backups:
        based = f" on {b.parent}" if b.parent else ""
        stdout.print(
            f"{b.label}  {b.type}{based}  stopped {b.stop_time}  {human_size(b.size)} stored as"
            f" {human_size(b.stored)}  {b.files} files  {b.duration_s:.1f}s  WAL {b.wal}"
            + (f"  changes from {b.changes}" if b.changes else ""),
            markup=False,
        )
        if b.copies is not None:
            c = b.copies
            stdout.print(
                f"    copies {c.copies} ({', '.join(['live', *c.repos])}), media"
                f" {len(c.media)} ({', '.join(c.media)}), offsite {c.offsite}:"
                f" 3-2-1 {'PASS' if c.passes else 'FAIL'}"
                + ("" if info.require_321 else " (not required)"),
                markup=False,
            )
    for label, reason in info.damaged.items():
        stderr.print(
            f"[red]error:[/red] backup '{label}' is DAMAGED and cannot be restored: {reason}",
            markup=True,
            highlight=False,
        )
    if not info.wal:
        stdout.print("no WAL archived")
    for t in info.wal:
        extra = "".join(
            [
                ", history file" if t.history else "",
                f", {len(t.partial)} .partial" * bool(t.partial),
            ]
        )
        stdout.print(
            f"WAL timeline {t.timeline}: {t.first or '-'}..{t.last or '-'}"
            f" ({t.segments} segments{extra})",
            markup=False,
        )
    for name, lag in info.wal_lag.items():
        if lag:
            stdout.print(f"WAL lag of repository '{name}': {lag} files behind (drkit replicate)")
    for name, drill in info.last_drill.items():
        stdout.print(f"last drill in '{name}': {_drill(drill)}", markup=False)
    for job, times in sorted(info.jobs.items()):
        stdout.print(f"job {job}: {_runs(times.last_ok, times.last_fail)}", markup=False)


def _runs(ok: datetime | None, fail: datetime | None) -> str:
    """'last success ..., last failure ...'; a failure newer than the success comes first."""
    success = f"last success {ok.isoformat(timespec='seconds')}" if ok else "never succeeded"
    if fail is None:
        return success
    failure = f"last failure {fail.isoformat(timespec='seconds')}"
    return f"FAILED: {failure}, {success}" if ok is None or fail > ok else f"{success}, {failure}"


def _drill(drill: dict[str, Any] | None) -> str:
    if drill is None:
        return "none recorded"
    outcome = drill["outcome"] + (f" ({drill['failure']})" if drill["failure"] else "")
    started = datetime.fromisoformat(drill["started_at"])
    return (
        f"{drill['id']} started {started.isoformat(timespec='seconds')} {outcome},"
        f" RTO {objective_text(**drill['rto'])}, RPO {objective_text(**drill['rpo'])},"
        f" backup {drill['backup'] or '-'}"
    )
