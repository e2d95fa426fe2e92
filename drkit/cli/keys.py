"""drkit keys: key management commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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

app = typer.Typer(help="Manage encryption keys.", no_args_is_help=True)

RepoOption = Annotated[
    str | None, typer.Option("--repo", help="only this repository (default: every one)")
]


@app.command("create-keyfile")
@handle_errors
def create_keyfile(
    path: Annotated[Path, typer.Argument(help="where to write the new 32-byte key (mode 0600)")],
) -> None:
    """Create a new random key file for the keyfile provider (refuses to overwrite)."""
    from drkit.crypto.keyfile import create_keyfile as create

    key_id = create(path)
    stdout.print(f"created key file '{path}' (key id {key_id}); keep a copy offline")


@app.command("escrow-init")
@handle_errors
def escrow_init(
    out: Annotated[
        Path, typer.Option("--out", help="writes OUT.pub and OUT.key (refuses to overwrite)")
    ],
    json_: JsonOption = False,
) -> None:
    """Create the break-glass recovery key pair: every data key is also wrapped to OUT.pub."""
    from drkit.crypto.escrow import create_recovery_keypair

    public, private, key_id = create_recovery_keypair(out)
    if json_:
        print_json(
            {"public_key_file": str(public), "recovery_key_file": str(private), "key_id": key_id}
        )
        return
    stdout.print(f"created recovery key {key_id}:", markup=False)
    stdout.print(f"  public  '{public}': set [keys.escrow] public_key_file to it", markup=False)
    stdout.print(
        f"  private '{private}' (mode 0600): print it, store it offline (a safe), then",
        markup=False,
    )
    stdout.print(
        "  delete it from this host; 'drkit restore --recovery-key' reads every backup "
        "escrowed from now on with it, without Vault",
        markup=False,
    )


@app.command("rotate")
@handle_errors
def rotate(config: ConfigOption = None, json_: JsonOption = False) -> None:
    """Make a new version of the wrapping key; new backups use it from now on."""
    from drkit.keys.rotate import rotate_key

    state = rotate_key(settings_from(config))
    if json_:
        print_json(state.as_dict())
        return
    stdout.print(
        f"{state.provider} key '{state.key}' is now at version {state.latest_version}; "
        "run 'drkit keys rewrap' to move stored data keys to it",
        markup=False,
    )


@app.command("rewrap")
@handle_errors
def rewrap(
    config: ConfigOption = None,
    repo: RepoOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="report, write nothing")] = False,
    json_: JsonOption = False,
) -> None:
    """Re-wrap every stored data key with the newest key version (and the escrow key); the
    backups' data is not touched and old key records are never rewritten."""
    from drkit.keys.rewrap import RewrapOperation

    report = RewrapOperation(settings_from(config), repo, dry_run).run()
    if json_:
        print_json(report.as_dict())
        raise typer.Exit(report.exit_code)
    verb = "would rewrap" if dry_run else "rewrapped"
    for r in report.rewrapped:
        versions = f"v{r.from_version} -> v{r.to_version}" if r.from_version else "same key"
        escrow = ", escrow added" if r.escrow_added else ""
        target = f" as '{r.new_record}'" if r.new_record else ""
        stdout.print(
            f"{r.repo}: {r.kind} {r.name}: {verb} {versions}{escrow}{target}", markup=False
        )
    warn_all(report.warnings)
    stdout.print(
        f"{len(report.rewrapped)} {verb}, {report.up_to_date} already up to date "
        f"(key '{report.key}'"
        + (f", version {report.latest_version})" if report.latest_version else ")"),
        markup=False,
    )
    raise typer.Exit(report.exit_code)


@app.command("status")
@handle_errors
def status(config: ConfigOption = None, repo: RepoOption = None, json_: JsonOption = False) -> None:
    """Which key versions the stored data keys depend on, and how far min_decryption_version
    may be raised without making any backup unreadable."""
    from drkit.keys.status import KeyStatusOperation

    report = KeyStatusOperation(settings_from(config), repo).run()
    if json_:
        print_json(report.as_dict())
        return
    for s in report.sets:
        version = f"v{s.version}" if s.version is not None else "-"
        escrow = f"escrow {s.escrow}" if s.escrow else "no escrow"
        key = f"{s.provider} '{s.key}' {version}" if s.problem is None else s.problem
        stdout.print(f"{s.repo}: {s.kind} {s.name}: {key}, {escrow}", markup=False)
    stdout.print(f"key {report.provider} '{report.key}'", markup=False)
    if report.latest_version is not None:
        needed = ", ".join(f"v{v} ({n})" for v, n in report.versions_needed.items()) or "none"
        stdout.print(
            f"  latest version {report.latest_version}, min_decryption_version "
            f"{report.min_decryption_version}; versions needed: {needed}",
            markup=False,
        )
        stdout.print(
            f"  min_decryption_version may be raised to {report.may_raise_to}"
            + (
                ""
                if report.may_raise_to == report.latest_version
                else f"; run 'drkit keys rewrap' to allow {report.latest_version}"
            ),
            markup=False,
        )
    if report.other_keys:
        warn(
            f"{len(report.other_keys)} key record sets are wrapped by another key; "
            "they cannot be read with the configured one"
        )
    if report.escrow is not None and report.without_escrow:
        warn(
            f"{len(report.without_escrow)} key record sets have no escrow part for recovery key "
            f"{report.escrow}; 'drkit keys rewrap' adds it"
        )
    if report.unsigned:
        warn(
            f"{len(report.unsigned)} key record sets are not signed, so the recovery key alone"
            " cannot read them; 'drkit keys rewrap' signs them"
        )
