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
    backup: Annotated[
        str | None,
        typer.Option(help="delete this one backup instead of applying the retention policy"),
    ] = None,
    with_dependents: Annotated[
        bool,
        typer.Option(
            "--with-dependents", help="with --backup: also delete the backups that depend on it"
        ),
    ] = False,
    json_: JsonOption = False,
) -> None:
    """Apply the retention policy: delete backups it no longer keeps (never a backup a kept one
    needs), leftovers of failed backups, and WAL no kept backup needs. Objects under Object Lock
    are skipped and reported (exit code 107).

    With --backup LABEL: delete that backup from every repository that has it (--repo: from
    that one). A backup others depend on is refused (exit 28) unless --with-dependents, which
    deletes them too, newest first; the newest backup always stays. Archived WAL is left for
    the next policy prune.
    """
    from drkit.prune.operation import prune_repositories
    from drkit.repo.events import recorded

    if with_dependents and backup is None:
        raise typer.BadParameter("--with-dependents goes with --backup LABEL")
    settings = settings_from(config)
    # one event per policy run in the repository (a dry run or a --backup deletion is none): a
    # timer's runs are remembered
    with recorded(None if dry_run or backup else settings, "prune") as run:
        report = prune_repositories(
            settings, repo, dry_run, backup=backup, with_dependents=with_dependents
        )
        if report.failure:
            run.failed(report.exit_code, report.failure)
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
    if r.policy.startswith("backup "):  # prune --backup LABEL
        _render_one_backup(r, verb)
        return
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


def _render_one_backup(r: RepoPrune, verb: str) -> None:
    label = (r.policy or "").removeprefix("backup ")
    stdout.print(f"repository '{r.repo}'", markup=False)
    for name in r.deleted:
        why = f" (depends on {label})" if name != label else ""
        stdout.print(f"  {verb} {name}{why}", markup=False)
    for name, why in r.held.items():
        stdout.print(f"  kept   {name} ({why})", markup=False)
    note = " (dry run: nothing was deleted)" if r.dry_run else ""
    stdout.print(f"{verb} {len(r.deleted)} backup(s){note}", markup=False)
