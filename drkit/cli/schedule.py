"""drkit schedule: run the [schedule] jobs with /metrics and health endpoints, or list them."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from drkit.cli.common import (
    ConfigOption,
    JsonOption,
    handle_errors,
    print_json,
    settings_from,
    stdout,
)
from drkit.config.settings import config_path
from drkit.errors import ConfigError

if TYPE_CHECKING:
    from drkit.config.settings import Settings


class EmitKind(StrEnum):
    systemd = "systemd"
    kubernetes = "kubernetes"


@handle_errors
def command(
    config: ConfigOption = None,
    list_: Annotated[
        bool, typer.Option("--list", help="print the next run of every job and exit")
    ] = False,
    emit: Annotated[
        EmitKind | None,
        typer.Option(
            help="write the systemd timers or the Kubernetes CronJobs of [schedule] to --out",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="directory --emit writes into", show_default=False)
    ] = None,
    instance: Annotated[
        str | None,
        typer.Option(help="systemd instance of the timers (default: the config file's name)"),
    ] = None,
    json_: JsonOption = False,
) -> None:
    """Run the jobs of [schedule] until SIGTERM or SIGINT, serving /metrics, /health/live and
    /health/ready on [metrics] listen. With --list, print when each job runs next; with --emit,
    write the systemd timers or Kubernetes CronJobs that run the same schedule.

    Example: drkit schedule --emit systemd --out /etc/systemd/system --config /etc/drkit/main.toml
    """
    settings = settings_from(config)
    if emit is not None:
        _emit(settings, emit, out, config_path(config), instance, json_)
        return
    if list_:
        from drkit.schedule.triggers import next_runs

        runs = next_runs(settings)
        if json_:
            print_json(
                [{"job": job, "cron": expr, "next_run": at.isoformat()} for job, expr, at in runs]
            )
        elif not runs:
            stdout.print("no job is scheduled: add cron expressions to [schedule]")
        else:
            width = max(len(job) for job, _, _ in runs)
            for job, expr, at in runs:
                stdout.print(f"{job:<{width}}  {at.isoformat()}  {expr}")
        return
    from drkit.schedule.daemon import Scheduler

    raise typer.Exit(Scheduler(settings, config_path(config)).run())


def _emit(
    settings: Settings,
    kind: EmitKind,
    out: Path | None,
    config: Path,
    instance: str | None,
    json_: bool,
) -> None:
    from drkit.schedule.emit import emit

    if out is None:
        raise ConfigError("--emit needs --out DIR", hint="e.g. --out /etc/systemd/system")
    name = instance or config.stem
    emitted = emit(settings, str(kind), out, config, name)
    if json_:
        print_json(
            {
                "written": [str(p) for p in emitted.written],
                "unchanged": [str(p) for p in emitted.unchanged],
                "skipped": emitted.skipped,
            }
        )
        return
    for path in emitted.written:
        stdout.print(f"wrote '{path}'", markup=False)
    for path in emitted.unchanged:
        stdout.print(f"'{path}' is up to date", markup=False)
    for job, why in emitted.skipped.items():
        stdout.print(f"{job}: no {kind} file: {why}", markup=False)
    if not emitted.written and not emitted.unchanged and not emitted.skipped:
        stdout.print("no job is scheduled: add cron expressions to [schedule]")
