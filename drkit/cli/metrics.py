"""drkit metrics: the Prometheus metrics, for node_exporter's textfile collector or stdout."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from drkit.cli.common import ConfigOption, handle_errors, settings_from


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
) -> None:
    """Compute drkit's metrics from the repositories; the scheduler's /metrics serves the same."""
    from drkit.schedule.metrics import collect, exposition, write_textfile

    settings = settings_from(config)
    samples = collect(settings)
    if textfile is None:
        sys.stdout.buffer.write(exposition(samples))
    else:
        write_textfile(textfile, samples)
