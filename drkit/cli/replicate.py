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
    warn_all,
)


@handle_errors
def command(config: ConfigOption = None, json_: JsonOption = False) -> None:
    """Copy missing backups and WAL to every other repository; report the WAL lag."""
    from drkit.replicate.operation import replicate_repositories
    from drkit.repo.events import recorded

    settings = settings_from(config)
    # one event per run in the repository: a timer's runs are remembered for metrics and reports
    with recorded(settings, "replicate") as run:
        result = replicate_repositories(settings)
        if result.failure:
            run.failed(result.exit_code, result.failure)
    if json_:
        print_json(result.as_dict())
    else:
        if not result.repos:
            stdout.print("only one repository is configured: nothing to replicate")
        for r in result.repos:
            if r.error is not None:
                continue  # a warning below
            lag = sum(r.wal_lag.values())
            stdout.print(
                f"repository '{r.repo}': {len(r.copied_backups)} backups"
                f" ({human_size(r.bytes)}) and {r.copied_wal} WAL files copied and verified;"
                f" WAL lag {lag} files",
                markup=False,
            )
        for name, ids in result.drills.copied.items():
            stdout.print(f"repository '{name}': {len(ids)} drill records copied and verified")
    warn_all(result.warnings)
    raise typer.Exit(result.exit_code)
