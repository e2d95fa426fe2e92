"""drkit restore: restore a backup into an empty directory."""

from __future__ import annotations

from pathlib import Path
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
)
from drkit.errors import ConfigError


def _parse_map(values: list[str]) -> dict[str, Path]:
    mapping: dict[str, Path] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or not name or not directory:
            raise ConfigError(f"--tablespace-map '{value}' is not OID=DIR or NAME=DIR")
        mapping[name] = Path(directory)
    return mapping


@handle_errors
def command(
    pgdata: Annotated[Path, typer.Option(help="empty directory to restore into")],
    config: ConfigOption = None,
    backup: Annotated[str | None, typer.Option(help="backup label, or 'latest'")] = None,
    repo: Annotated[str | None, typer.Option(help="repository to restore from")] = None,
    tablespace_map: Annotated[
        list[str] | None,
        typer.Option(
            "--tablespace-map", help="restore a tablespace elsewhere: OID=DIR or NAME=DIR"
        ),
    ] = None,
    process_max: Annotated[int | None, typer.Option(help="parallel workers")] = None,
    json_: JsonOption = False,
) -> None:
    """Restore a backup into an empty directory and print how to start it."""
    from drkit.restore.operation import RestoreOperation, RestoreRequest

    settings = settings_from(config, {"backup": {"process_max": process_max}})
    request = RestoreRequest(
        pgdata=pgdata, backup=backup, repo=repo, tablespace_map=_parse_map(tablespace_map or [])
    )
    result = RestoreOperation(settings, request, progress()).run()
    if json_:
        print_json(
            {
                "label": result.label,
                "pgdata": str(result.pgdata),
                "files": result.files,
                "size": result.size,
                "tablespaces": {str(k): str(v) for k, v in result.tablespaces.items()},
                "start_command": result.start_command,
            }
        )
        return
    stdout.print(
        f"restored backup {result.label} to '{result.pgdata}': {result.files} files,"
        f" {human_size(result.size)}, every checksum verified"
    )
    for oid, directory in result.tablespaces.items():
        stdout.print(f"  tablespace {oid} -> '{directory}'")
    stdout.print("next: start the restored cluster (it replays the backup's WAL, then opens):")
    stdout.print(f"  {result.start_command}", markup=False)
