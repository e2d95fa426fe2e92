"""drkit check: prove WAL archiving works end to end; ``--nagios`` for monitoring systems."""

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
    warn_all,
)
from drkit.errors import DrkitError

# The monitoring-plugin convention (Nagios, Icinga, Zabbix's, Sensu's checks).
NAGIOS_OK, NAGIOS_WARNING, NAGIOS_CRITICAL = 0, 1, 2


@handle_errors
def command(
    config: ConfigOption = None,
    timeout: Annotated[
        float,
        typer.Option(min=1, help="seconds to wait for the segment in every repository"),
    ] = 60.0,
    nagios: Annotated[
        bool,
        typer.Option(
            "--nagios",
            help="one line 'DRKIT OK|WARNING|CRITICAL - ...' and exit 0, 1 or 2 (a monitoring"
            " plugin's protocol)",
        ),
    ] = False,
    json_: JsonOption = False,
) -> None:
    """Make PostgreSQL archive a fresh WAL segment and wait until it is in every repository,
    read back with the key; report pg_stat_archiver's failures.

    Exit 0 ok; 110 a secondary not caught up; 108 archive_command failures meanwhile (1: both);
    23 archiving broken (off, or the segment never reached the primary repository); other
    codes as every command. With --nagios: 0 OK, 1 WARNING, 2 CRITICAL.
    """
    from drkit.check.operation import CheckRequest, check_archiving

    request = CheckRequest(timeout=timeout)
    if nagios:
        try:
            result = check_archiving(settings_from(config), request)
        except DrkitError as exc:
            stdout.print(f"DRKIT CRITICAL - {_one_line(exc.message)}", markup=False)
            raise typer.Exit(NAGIOS_CRITICAL) from None
        if result.warnings:
            problems = "; ".join(_one_line(w.message) for w in result.warnings)
            stdout.print(f"DRKIT WARNING - {problems}", markup=False)
            raise typer.Exit(NAGIOS_WARNING)
        stdout.print(f"DRKIT OK - {result.summary()}", markup=False)
        raise typer.Exit(NAGIOS_OK)

    result = check_archiving(settings_from(config), request)
    if json_:
        print_json(result.as_dict())
    else:
        stdout.print(f"archive_command = '{result.archive_command}'", markup=False)
        stdout.print(result.summary(), markup=False)
        warn_all(result.warnings)
        stdout.print("status: ok" if not result.warnings else "status: warning", markup=False)
    raise typer.Exit(result.exit_code)


def _one_line(text: str) -> str:
    return " ".join(text.split())
