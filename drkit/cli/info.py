"""drkit info: the backups in a repository."""

from __future__ import annotations

from typing import Annotated

import typer

from drkit.cli.common import (
    ConfigOption,
    JsonOption,
    RecoveryKeyOption,
    handle_errors,
    human_size,
    print_json,
    settings_from,
    stderr,
    stdout,
    warn,
)
from drkit.errors import IntegrityError


@handle_errors
def command(
    config: ConfigOption = None,
    repo: Annotated[str | None, typer.Option(help="repository to describe")] = None,
    recovery_key: RecoveryKeyOption = None,
    json_: JsonOption = False,
) -> None:
    """List the backups in the repository."""
    from drkit.info.operation import InfoOperation

    settings = settings_from(config, {"keys": {"recovery_key": recovery_key}})
    info = InfoOperation(settings, repo).run()
    if json_:
        print_json(info.as_dict())
        _exit(info.rule_3_2_1 or not info.backups, bool(info.damaged))
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
            f" {human_size(b.stored)}  {b.files} files  {b.duration_s:.1f}s  WAL {b.wal}"
            + (f"  changes from {b.changes}" if b.changes else ""),
            markup=False,
        )
        if b.copies is not None:
            c = b.copies
            stdout.print(
                f"    copies {c.copies} ({', '.join(['live', *c.repos])}), media"
                f" {len(c.media)} ({', '.join(c.media)}), offsite {c.offsite}:"
                f" 3-2-1 {'PASS' if c.passes else 'FAIL'}",
                markup=False,
            )
    for label, reason in info.damaged.items():
        stderr.print(
            f"[red]error:[/red] backup '{label}' is DAMAGED and cannot be restored: {reason}",
            markup=True,
            highlight=False,
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
    for name, error in info.unreachable.items():
        warn(f"repository '{name}' is unreachable: {error}")
    for name, lag in info.wal_lag.items():
        if lag:
            stdout.print(f"WAL lag of repository '{name}': {lag} files behind (drkit replicate)")
    if info.backups and not info.rule_3_2_1:
        warn("the newest backup does not meet 3-2-1 (3 copies, 2 media, 1 offsite)")
    _exit(info.rule_3_2_1 or not info.backups, bool(info.damaged))


def _exit(passes: bool, damaged: bool) -> None:
    """A damaged backup is an error (exit code 13, after listing everything else); a failing
    3-2-1 rule is a warning: exit code 1."""
    if damaged:
        raise typer.Exit(IntegrityError.exit_code)
    if not passes:
        raise typer.Exit(1)
