"""drkit backup: take a physical backup of the cluster into the primary repository."""

from __future__ import annotations

from typing import Annotated

import typer

from drkit.cli.common import (
    ConfigOption,
    JsonOption,
    handle_errors,
    human_size,
    print_json,
    progress,
    settings_from,
    stdout,
    stopped_by_signals,
    warn,
    warn_all,
)
from drkit.errors import DrkitError
from drkit.interrupts import Interrupted
from drkit.repo.label import BackupType
from drkit.repo.manifest import CHANGES_FROM


@handle_errors
def command(
    config: ConfigOption = None,
    type_: Annotated[
        BackupType, typer.Option("--type", "-t", help="backup type")
    ] = BackupType.FULL,
    start_fast: Annotated[
        bool | None,
        typer.Option("--start-fast/--no-start-fast", help="immediate checkpoint at start"),
    ] = None,
    process_max: Annotated[int | None, typer.Option(help="parallel workers")] = None,
    compress_level: Annotated[int | None, typer.Option(help="zstd level")] = None,
    json_: JsonOption = False,
) -> None:
    """Take a physical backup: full, diff (pages changed since the last full) or incr (since the
    last backup of any type)."""
    from drkit.backup.operation import take_backup
    from drkit.repo.events import recorded

    settings = settings_from(
        config,
        {
            "backup": {
                "start_fast": start_fast,
                "process_max": process_max,
                "compress_level": compress_level,
            }
        },
    )
    # one event per run in the repository: a timer's runs are remembered for metrics and reports
    with stopped_by_signals(_interrupted), recorded(settings, str(type_)):
        result = take_backup(settings, type_, progress())
    m = result.manifest
    for label in result.removed_leftovers:
        warn(f"removed the objects of incomplete backup '{label}'")
    warn_all(result.warnings)
    if json_:
        print_json(result.as_dict())
    else:
        stdout.print(
            f"backup {m.label} ({m.type}) complete: {m.stats.files} files,"
            f" {human_size(m.stats.size)} stored as {human_size(m.stats.stored)}"
            f" in {m.stats.duration_s:.1f}s; WAL {m.start_wal}..{m.stop_wal}"
            + (f"; changes found by {CHANGES_FROM[m.stats.changes]}" if m.stats.changes else "")
        )
    raise typer.Exit(result.exit_code)


def _interrupted(exc: Interrupted) -> DrkitError:
    return DrkitError(
        f"backup interrupted by {exc.signal}: the server left backup mode and nothing of this"
        " backup is listed",
        hint="the next backup removes what it had written",
    )
