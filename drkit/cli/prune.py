"""drkit prune: delete the backups and WAL each repository's retention policy no longer keeps."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from drkit.cli.common import (
    ConfigOption,
    JsonOption,
    handle_errors,
    print_json,
    settings_from,
    stderr,
    stdout,
    warn_all,
)

if TYPE_CHECKING:
    from drkit.prune.operation import RepoPrune


@handle_errors
def command(
    config: ConfigOption = None,
    repo: Annotated[
        str | None, typer.Option(help="prune only this repository (default: every one)")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="list what would be deleted; delete nothing")
    ] = False,
    json_: JsonOption = False,
) -> None:
    """Apply the retention policy: delete backups it no longer keeps (never a backup a kept one
    needs), leftovers of failed backups, and WAL no kept backup needs. Objects under Object Lock
    are skipped and reported (exit code 107)."""
    from drkit.prune.operation import prune_repositories

    report = prune_repositories(settings_from(config), repo, dry_run)
    if json_:
        print_json(report.as_dict())
    else:
        for result in report.repos:
            _render(result)
        warn_all(report.warnings)
    raise typer.Exit(report.exit_code)


def _render(r: RepoPrune) -> None:
    if r.policy is None:
        stdout.print(f"repository '{r.repo}': no retention policy, nothing pruned")
        return
    if r.error is not None:
        stderr.print(f"[red]error:[/red] repository '{r.repo}': {r.error.message}", markup=True)
        if r.error.hint:
            stderr.print(f"HINT: {r.error.hint}", markup=False)
        return
    verb = "would delete" if r.dry_run else "deleted"
    stdout.print(f"repository '{r.repo}' (retention: {r.policy})")
    for label, reasons in r.kept.items():
        stdout.print(f"  keep   {label}  ({'; '.join(reasons)})")
    for label in r.deleted:
        stdout.print(f"  {verb} {label}")
    for label in r.leftovers:
        stdout.print(f"  {verb} {label} (leftover of an incomplete backup)")
    for cut in r.wal_cuts:
        names = [n for n in r.wal_deleted if int(n[:8], 16) == cut.timeline]
        if names:
            stdout.print(
                f"  {verb} {len(names)} WAL file(s) of timeline {cut.timeline}:"
                f" {names[0]} .. {names[-1]}"
            )
    if r.drills_deleted:
        assert r.drills_kept_since is not None
        since = r.drills_kept_since.date().isoformat()
        stdout.print(
            f"  {verb} {len(r.drills_deleted)} drill record(s) of drills before {since}:"
            f" {r.drills_deleted[0]} .. {r.drills_deleted[-1]}"
        )
    note = " (dry run: nothing was deleted)" if r.dry_run else ""
    stdout.print(
        f"{verb} {len(r.deleted)} backup(s), {len(r.leftovers)} leftover(s),"
        f" {len(r.wal_deleted)} WAL file(s); kept {len(r.kept)} backup(s){note}"
    )
