"""The drkit command line: each command parses, loads settings, runs one operation, renders."""

from __future__ import annotations

from typing import Annotated

import typer

from drkit import __version__
from drkit.cli import backup, info, init, keys, restore, verify

app = typer.Typer(
    name="drkit",
    help="Backup and disaster recovery for PostgreSQL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"drkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="show the version")
    ] = False,
) -> None:
    """Backup and disaster recovery for PostgreSQL."""


app.command("init")(init.command)
app.command("backup")(backup.command)
app.command("info")(info.command)
app.command("verify")(verify.command)
app.command("restore")(restore.command)
app.add_typer(keys.app, name="keys")


def main() -> None:
    app()
