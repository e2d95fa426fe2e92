"""drkit info: the backups in a repository."""

from __future__ import annotations

from typing import Annotated

import typer

from drkit.cli.common import (
    ConfigOption,
    JsonOption,
    handle_errors,
    human_size,
    print_json,
    settings_from,
    stdout,
    warn,
)


@handle_errors
def command(
    config: ConfigOption = None,
    repo: Annotated[str | None, typer.Option(help="repository to describe")] = None,
    json_: JsonOption = False,
) -> None:
    """List the backups in the repository."""
    from drkit.info.operation import InfoOperation

    info = InfoOperation(settings_from(config), repo).run()
    if json_:
        print_json(info.as_dict())
        return
    stdout.print(
        f"repository '{info.name}' (system {info.system_identifier}, format {info.format})"
    )
    if not info.backups:
        stdout.print("no backups yet")
    for b in info.backups:
        based = f" on {b.parent}" if b.parent else ""
        stdout.print(
            f"{b.label}  {b.type}{based}  stopped {b.stop_time}  {human_size(b.size)} stored as"
            f" {human_size(b.stored)}  {b.files} files  {b.duration_s:.1f}s  WAL {b.wal}",
            markup=False,
        )
    for label in info.incomplete:
        warn(f"incomplete backup '{label}' (never listed; removed by the next backup)")
