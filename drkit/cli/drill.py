"""drkit drill: restore drills; ``drkit drill list`` shows the recorded ones."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from drkit.cli.common import (
    ConfigOption,
    JsonOption,
    RecoveryKeyOption,
    handle_errors,
    objective_text,
    print_json,
    settings_from,
    stdout,
    warn_all,
)

if TYPE_CHECKING:
    from drkit.drill.records import ListedDrill

app = typer.Typer(
    help="Restore drills: prove a backup restores, measure RTO and RPO, keep the record.",
    no_args_is_help=True,
)

COLUMNS = ("ID", "STARTED", "KIND", "SCENARIO", "BACKUP", "REPOSITORY", "RTO", "RPO", "RESULT")


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
    """List past drills from the repositories' records, oldest first. RTO and RPO show
    achieved/target; a record that fails authentication is listed as UNAUTHENTIC (exit 1)."""
    from drkit.drill.records import DrillListOperation

    settings = settings_from(config, {"keys": {"recovery_key": recovery_key}})
    result = DrillListOperation(settings, repo).run()
    warn_all(result.warnings)
    if json_:
        print_json(result.as_dict())
        raise typer.Exit(result.exit_code)
    if not result.drills:
        stdout.print(f"no drill records in {', '.join(map(repr, result.repositories))}")
        raise typer.Exit(result.exit_code)
    rows = [COLUMNS, *(_row(d) for d in result.drills)]
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
