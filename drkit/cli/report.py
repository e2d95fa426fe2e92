"""drkit report: the DR exercise report of a quarter (or of any span of days)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from drkit.cli.common import (
    ConfigOption,
    JsonOption,
    RecoveryKeyOption,
    handle_errors,
    print_json,
    settings_from,
    stdout,
    warn_all,
)


@handle_errors
def command(
    config: ConfigOption = None,
    quarter: Annotated[
        str | None, typer.Option(help="the quarter, e.g. 2026Q4 (default: the current one)")
    ] = None,
    from_: Annotated[
        datetime | None,
        typer.Option("--from", formats=["%Y-%m-%d"], help="first day (with --to)"),
    ] = None,
    to: Annotated[
        datetime | None, typer.Option(formats=["%Y-%m-%d"], help="last day, included")
    ] = None,
    format_: Annotated[
        list[str] | None,
        typer.Option("--format", "-f", help="html, pdf, md or json; repeat for several"),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="directory to write the report files into (default: \\[report] out, else the"
            " current directory)",
            show_default=False,
        ),
    ] = None,
    repo: Annotated[
        str | None,
        typer.Option(help="read from this repository (default: the first that can be read)"),
    ] = None,
    recovery_key: RecoveryKeyOption = None,
    json_: JsonOption = False,
) -> None:
    """Write the DR exercise report (default: HTML and JSON) and print its verdict."""
    from drkit.report.operation import ReportOperation, ReportRequest
    from drkit.report.period import days
    from drkit.report.period import quarter as parse_quarter

    if quarter is not None and (from_ is not None or to is not None):
        raise typer.BadParameter("give --quarter or --from/--to, not both")
    if (from_ is None) != (to is None):
        raise typer.BadParameter("--from and --to go together")
    try:
        if quarter is not None:
            period = parse_quarter(quarter)
        elif from_ is not None and to is not None:
            period = days(from_.date(), to.date())
        else:
            period = None
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    settings = settings_from(config, {"keys": {"recovery_key": recovery_key}})
    request = ReportRequest(
        period=period,
        formats=tuple(format_ or ("html", "json")),
        out=out or settings.report.out or Path("."),
        repo=repo,
    )
    result = ReportOperation(settings, request).run()
    warn_all(result.warnings)
    if json_:
        print_json(result.as_dict())
    else:
        stdout.print(result.report.summary.verdict_line, markup=False)
        for fmt, path in result.paths.items():
            stdout.print(f"{fmt}: {path}", markup=False)
    raise typer.Exit(result.exit_code)
