"""drkit verify: read back, decrypt and check every file of one backup or all."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from drkit.cli.common import (
    ConfigOption,
    JsonOption,
    RecoveryKeyOption,
    handle_errors,
    human_size,
    print_json,
    progress,
    settings_from,
    stderr,
    stdout,
    stopped_by_signals,
    warn_all,
)
from drkit.errors import DrkitError
from drkit.interrupts import Interrupted

if TYPE_CHECKING:
    from drkit.verify.operation import VerifyReport


@handle_errors
def command(
    config: ConfigOption = None,
    backup: Annotated[str | None, typer.Option(help="backup label (default: every backup)")] = None,
    repo: Annotated[str | None, typer.Option(help="repository to verify")] = None,
    recovery_key: RecoveryKeyOption = None,
    wal: Annotated[
        bool, typer.Option("--wal", help="also read back every archived WAL file, find gaps")
    ] = False,
    json_: JsonOption = False,
) -> None:
    """Verify backups: every object read, every frame authenticated, every checksum checked."""
    from drkit.repo.events import recorded
    from drkit.verify.operation import verify_backups

    settings = settings_from(config, {"keys": {"recovery_key": recovery_key}})
    # one event per run in the repository: a timer's runs are remembered for metrics and reports
    with stopped_by_signals(_interrupted), recorded(settings, "verify") as run:
        report = verify_backups(settings, backup, repo, progress(), wal=wal)
        if report.failure:
            run.failed(report.exit_code, report.failure)
    warn_all(report.warnings)
    if json_:
        print_json(report.as_dict())
    else:
        _render(report)
    raise typer.Exit(report.exit_code)


def _interrupted(exc: Interrupted) -> DrkitError:
    return DrkitError(
        f"verify interrupted by {exc.signal}: what it had not finished was not recorded as"
        " verified",
        hint="run 'drkit verify' again (--backup LABEL verifies one backup)",
    )


def _render(report: VerifyReport) -> None:
    for b in report.backups:
        status = "ok" if b.ok else f"DAMAGED ({len(b.damaged)} files)"
        if not b.damaged and b.unrestorable is not None:
            status = f"UNRESTORABLE: {b.unrestorable}"
        stdout.print(f"{b.label}: {b.files} files, {human_size(b.size)}: {status}")
        for path, reason in b.damaged:
            stderr.print(f"  damaged '{path}': {reason}", markup=False)
    if not report.backups:
        stdout.print(f"repository '{report.repo}' holds no backups")
    if report.wal is not None:
        status = "ok" if report.wal.ok else "DAMAGED"
        stdout.print(f"archived WAL: {report.wal.files} files: {status}")
        for name, reason in report.wal.damaged:
            stderr.print(f"  damaged WAL file '{name}': {reason}", markup=False)
        for timeline, first, last in report.wal.gaps:
            stderr.print(f"  WAL gap on timeline {timeline}: {first}..{last}", markup=False)
        for timeline, reason in report.wal.foreign:
            stderr.print(f"  foreign WAL timeline {timeline}: {reason}", markup=False)
