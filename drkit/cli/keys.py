"""drkit keys: key management commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from drkit.cli.common import handle_errors, stdout

app = typer.Typer(help="Manage encryption keys.", no_args_is_help=True)


@app.command("create-keyfile")
@handle_errors
def create_keyfile(
    path: Annotated[Path, typer.Argument(help="where to write the new 32-byte key (mode 0600)")],
) -> None:
    """Create a new random key file for the keyfile provider (refuses to overwrite)."""
    from drkit.crypto.keyfile import create_keyfile as create

    key_id = create(path)
    stdout.print(f"created key file '{path}' (key id {key_id}); keep a copy offline")
