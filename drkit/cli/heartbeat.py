"""drkit heartbeat: keep a heartbeat row on the source so drills measure the RPO exactly."""

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
from drkit.config.durations import parse_duration


def _interval(value: str | None) -> str | None:
    if value is not None:
        try:
            parse_duration(value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    return value


@handle_errors
def command(
    config: ConfigOption = None,
    interval: Annotated[
        str | None,
        typer.Option(
            callback=_interval,
            help="time between beats, e.g. '10s' (default: [heartbeat] interval)",
            show_default=False,
        ),
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="write one beat and exit")] = False,
    json_: JsonOption = False,
) -> None:
    """Upsert one row (id 1, the server's now()) into the [heartbeat] table every interval,
    until SIGTERM or Ctrl-C; failures are logged and retried. Drills read the row to measure
    how much a restore would lose."""
    from drkit.heartbeat.operation import HeartbeatOperation

    settings = settings_from(config, {"heartbeat": {"interval": interval}} if interval else None)
    result = HeartbeatOperation(settings, once=once).run()
    if json_:
        print_json(result.as_dict())
    else:
        at = result.last_at.isoformat(timespec="seconds") if result.last_at else "never"
        stopped = f"stopped by {result.stopped_by}: " if result.stopped_by else ""
        stdout.print(
            f"heartbeat {stopped}{result.beats} beats, {result.failures} failed, last at {at}",
            markup=False,
        )
    raise typer.Exit(result.exit_code)
