"""drkit verify: read back, decrypt and check every file of one backup or all."""

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
    progress,
    settings_from,
    stderr,
    stdout,
)
from drkit.errors import VerifyFailed


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
    from drkit.verify.operation import VerifyOperation

    settings = settings_from(config, {"keys": {"recovery_key": recovery_key}})
    report = VerifyOperation(settings, backup, repo, progress(), wal=wal).run()
    if json_:
        print_json(
            {
                "repo": report.repo,
                "ok": report.ok,
                "backups": [
                    {
                        "label": b.label,
                        "ok": b.ok,
                        "files": b.files,
                        "size": b.size,
                        "damaged": [{"path": p, "reason": r} for p, r in b.damaged],
                        "unrestorable": b.unrestorable,
                    }
                    for b in report.backups
                ],
                "wal": None
                if report.wal is None
                else {
                    "ok": report.wal.ok,
                    "files": report.wal.files,
                    "damaged": [{"name": n, "reason": r} for n, r in report.wal.damaged],
                    "gaps": [{"timeline": t, "first": a, "last": b} for t, a, b in report.wal.gaps],
                    "foreign_timelines": [
                        {"timeline": t, "reason": r} for t, r in report.wal.foreign
                    ],
                },
            }
        )
    else:
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
    if not report.ok:
        raise typer.Exit(VerifyFailed.exit_code)
