"""drkit prune --backup LABEL: delete one backup by hand, with the safety retention keeps.

The operator names the backup; everything else follows the rules of a policy prune: the
backups that depend on it go only with ``--with-dependents`` (listed, newest first, each
manifest first), the newest backup always stays (it is the one a restore takes), and an object
under a retention lock is never forced: a locked manifest keeps its backup listed, and with it
every backup that backup needs. Archived WAL is left to the next policy prune, which knows the
recovery window the WAL may still serve.
"""

from __future__ import annotations

from drkit.errors import BackupDeletionRefused, BackupNotFound
from drkit.prune.operation import RepoPrune, delete_backup, hold_needs, readable_facts
from drkit.repo.label import BackupLabel
from drkit.repo.lease import RepositoryLease
from drkit.repo.repository import Repository


def delete_one_backup(
    repo: Repository,
    label: str,
    with_dependents: bool,
    dry_run: bool,
    result: RepoPrune,
    lease: RepositoryLease | None = None,
) -> None:
    """Delete ``label`` (and, with ``with_dependents``, the backups that need it) from
    ``repo``; the caller holds the backup lock and ``lease`` (checked before each deletion).
    BackupNotFound when ``repo`` does not list it, BackupDeletionRefused before anything is
    deleted when it would break a restore."""
    repo.check()
    listed = [str(b) for b in repo.backups()]
    if label not in listed:
        raise BackupNotFound(
            f"backup '{label}' is not in repository '{repo.name}'",
            hint="'drkit info' lists the backups",
        )
    facts = readable_facts(repo, result)
    dependents = sorted(
        other
        for other in listed
        if other != label
        and (label in facts[other].needs if other in facts else _may_need(other, label))
    )
    if dependents and not with_dependents:
        raise BackupDeletionRefused(
            f"backup '{label}' cannot be deleted alone: {len(dependents)} backup(s) depend on"
            f" it: {', '.join(dependents)}",
            hint="add --with-dependents to delete them too (with --dry-run first to see the list)",
        )
    going = [*reversed(dependents), label]  # newest first: no backup before one needing it
    newest = str(max(facts.values(), key=lambda f: f.stop_time).label) if facts else listed[-1]
    if newest in going:
        raise BackupDeletionRefused(
            f"backup '{newest}' is the newest backup in repository '{repo.name}': prune"
            " always keeps it",
            hint="take a new backup first; then this one can go",
        )
    result.dependents = dependents
    if dry_run:
        result.deleted = going
        return
    for name in going:
        if lease is not None:
            lease.check()
        if name in result.held:
            hold_needs(result, facts, facts[name].needs if name in facts else frozenset(), name)
        elif delete_backup(repo, name, result):
            result.deleted.append(name)
        else:
            result.held[name] = "its manifest is under a retention lock"
            hold_needs(result, facts, facts[name].needs if name in facts else frozenset(), name)


def _may_need(other: str, label: str) -> bool:
    """For a backup whose manifest cannot be read: whether its label's lineage says it may
    need ``label`` (a newer member of the same full backup's chain)."""
    parsed = BackupLabel(label)
    return other > label and BackupLabel(other).full == parsed.full
