"""drkit schedule: run the [schedule] jobs with /metrics and health endpoints, or list them."""

from __future__ import annotations

from typing import Annotated

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


@handle_errors
def command(
    config: ConfigOption = None,
    list_: Annotated[
        bool, typer.Option("--list", help="print the next run of every job and exit")
    ] = False,
    json_: JsonOption = False,
) -> None:
    """Run the jobs of [schedule] until SIGTERM or SIGINT, serving /metrics, /health/live and
    /health/ready on [metrics] listen. With --list, print when each job runs next."""
    settings = settings_from(config)
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
