"""drkit drill note / drill signoff: findings with actions, and the sign-off of a period's
drills, as write-once records the report shows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

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

if TYPE_CHECKING:
    from drkit.errors import DrkitWarning


@handle_errors
def note(
    drill: Annotated[str, typer.Argument(help="the drill id ('drkit drill list')")],
    finding: Annotated[str, typer.Option(help="what the drill showed")],
    action: Annotated[str, typer.Option(help="what will be done about it")] = "",
    owner: Annotated[str, typer.Option(help="who does it")] = "",
    config: ConfigOption = None,
    json_: JsonOption = False,
) -> None:
    """Record a finding about a drill, with its action and owner (shown in the report)."""
    from drkit.report.notes import add_finding

    result = add_finding(settings_from(config), drill, finding, action, owner)
    _render(result.as_dict(), result.warnings, json_, f"finding {result.note.id} on {drill}")
    raise typer.Exit(result.exit_code)


@handle_errors
def signoff(
    by: Annotated[str, typer.Option(help="who signs: name and role")],
    quarter: Annotated[str | None, typer.Option(help="the quarter signed off, e.g. 2026Q4")] = None,
    period: Annotated[
        str | None, typer.Option(help="or a span of days: 2026-10-01..2026-12-31")
    ] = None,
    statement: Annotated[str, typer.Option(help="an optional statement")] = "",
    config: ConfigOption = None,
    json_: JsonOption = False,
) -> None:
    """Sign off a period's drills (shown in that period's report)."""
    from drkit.report.notes import add_signoff, period_label

    if (quarter is None) == (period is None):
        raise typer.BadParameter("give --quarter or --period")
    wanted = quarter or period
    assert wanted is not None
    try:
        period_label(wanted)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    result = add_signoff(settings_from(config), wanted, by, statement)
    _render(result.as_dict(), result.warnings, json_, f"sign-off {result.note.id} of {wanted}")
    raise typer.Exit(result.exit_code)


def _render(data: dict[str, Any], warnings: list[DrkitWarning], json_: bool, what: str) -> None:
    warn_all(warnings)
    if json_:
        print_json(data)
    else:
        stdout.print(f"{what} written to: {', '.join(data['written'])}", markup=False)


def register(app: typer.Typer) -> None:
    """Add ``note`` and ``signoff`` to the ``drkit drill`` sub-app."""
    app.command("note")(note)
    app.command("signoff")(signoff)
