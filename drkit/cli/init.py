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
    warn,
    warn_all,
)


@handle_errors
def command(config: ConfigOption = None, json_: JsonOption = False) -> None:
    """Validate the configuration and the cluster's settings, and create the repositories."""
    from drkit.init.operation import InitOperation

    report = InitOperation(settings_from(config), config).run()
    if json_:
        print_json(
            {
                "system_identifier": str(report.system_identifier),
                "pg_version_num": report.pg_version_num,
                "checks": [c.__dict__ for c in report.checks],
                "repositories": report.repositories,
                "warnings": [w.as_dict() for w in report.problems],
            }
        )
    else:
        for check in report.checks:
            if check.level == "warning":
                warn(check.message)
            else:
                stdout.print(f"{check.level}: {check.message}")
        for name, state in report.repositories.items():
            stdout.print(f"repository '{name}': {state}")
        warn_all(report.problems)
    raise typer.Exit(report.exit_code)
