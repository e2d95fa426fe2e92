"""drkit replicate: catch every other repository up with the primary, verify the copies."""

from __future__ import annotations

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
def command(config: ConfigOption = None, json_: JsonOption = False) -> None:
    """Copy missing backups and WAL to every other repository; report the WAL lag."""
    from drkit.replicate.operation import ReplicateOperation

    report = ReplicateOperation(settings_from(config)).run()
    if json_:
        print_json(
            {
                "ok": report.ok,
                "repos": [r.__dict__ for r in report.repos],
                "drills": report.drills.__dict__,
            }
        )
    else:
        if not report.repos:
            stdout.print("only one repository is configured: nothing to replicate")
        for r in report.repos:
            if r.error is not None:
                warn(f"repository '{r.repo}': {r.error}")
                continue
            lag = sum(r.wal_lag.values())
            stdout.print(
                f"repository '{r.repo}': {len(r.copied_backups)} backups"
                f" ({human_size(r.bytes)}) and {r.copied_wal} WAL files copied and verified;"
                f" WAL lag {lag} files",
                markup=False,
            )
        for name, ids in report.drills.copied.items():
            stdout.print(f"repository '{name}': {len(ids)} drill records copied and verified")
        for name, error in report.drills.errors.items():
            warn(f"repository '{name}': drill records not caught up: {error}")
    if not report.ok:
        raise typer.Exit(1)
