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
    if not info.wal:
        stdout.print("no WAL archived")
    for t in info.wal:
        extra = "".join(
            [
                ", history file" if t.history else "",
                f", {len(t.partial)} .partial" * bool(t.partial),
            ]
        )
        stdout.print(
            f"WAL timeline {t.timeline}: {t.first or '-'}..{t.last or '-'}"
            f" ({t.segments} segments{extra})",
            markup=False,
        )
        for first, last in t.missing:
            span = first if first == last else f"{first}..{last}"
            warn(f"WAL archive gap on timeline {t.timeline}: {span} missing")
