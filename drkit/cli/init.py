"""drkit init: check the cluster, prove the key works, create the repositories."""

from __future__ import annotations

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


@handle_errors
def command(config: ConfigOption = None, json_: JsonOption = False) -> None:
    """Validate the configuration and the cluster's settings, and create the repositories."""
    from drkit.init.operation import initialize

    report = initialize(settings_from(config), config)
    if json_:
        print_json(report.as_dict())
    else:
        for check in report.checks:
            stdout.print(f"{check.level}: {check.message}")
        for name, state in report.repositories.items():
            stdout.print(f"repository '{name}': {state}")
    warn_all(report.warnings)
    raise typer.Exit(report.exit_code)
