"""drkit metrics: the Prometheus metrics, for node_exporter's textfile collector or stdout, or
served on /metrics by a long-running exporter."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from drkit.cli.common import ConfigOption, handle_errors, settings_from
from drkit.errors import ConfigError


@handle_errors
def command(
    config: ConfigOption = None,
    textfile: Annotated[
        Path | None,
        typer.Option(
            help="write to this .prom file atomically (node_exporter's textfile collector)",
            show_default=False,
        ),
    ] = None,
    serve: Annotated[
        bool,
        typer.Option(
            "--serve",
            help="serve /metrics, /health/live and /health/ready on [metrics] listen until"
            " SIGTERM, running no job (for CronJobs and timers)",
        ),
    ] = False,
) -> None:
    """Compute drkit's metrics from the repositories; the scheduler's /metrics serves the same.
    With --serve, stay up and serve them as drkit schedule does, without its jobs."""
    if serve and textfile is not None:
        raise ConfigError(
            "--serve and --textfile cannot be used together",
            hint="--serve for Prometheus to scrape, --textfile for node_exporter",
        )
    settings = settings_from(config)
    if serve:
        from drkit.schedule.exporter import serve_metrics

        raise typer.Exit(serve_metrics(settings))
    from drkit.schedule.metrics import collect, exposition, write_textfile

    samples = collect(settings)
    if textfile is None:
        sys.stdout.buffer.write(exposition(samples))
    else:
        write_textfile(textfile, samples)
