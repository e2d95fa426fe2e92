"""Restore a backup into an empty directory, checking every file's checksum as it is written
(or, as a delta restore, over an existing data directory: restore/delta.py).

The restored directory holds backup_label and the WAL from the backup's start to its stop in
pg_wal, so PostgreSQL replays exactly that WAL at startup and comes up consistent without any
archive. Tablespaces are restored as pg_tblspc symlinks to their (optionally remapped) directories,
the way pg_basebackup's plain format does it, so no tablespace_map is needed.

Every manifest of the chain is checked before anything is written (repo/safety.py), files are
created only inside the target and the tablespace directories the operator confirmed
(restore/paths.py), and the copy is configured with ``archive_mode = off`` unless asked to keep
the source's archiving: a copy started beside production must not archive into its repository.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from drkit.config.settings import Settings, config_path
from drkit.crypto.walkeys import WAL_KEYS_FILE, wal_keys_document
from drkit.errors import (
    ConfigError,
    DrkitError,
    DrkitWarning,
    RepositoryUnreachable,
    RestoreTargetError,
    UnsafeManifest,
)
from drkit.fsutil import os_reason
from drkit.interrupts import Interrupted, uninterruptible
from drkit.pg.recovery import RecoveryTarget, check_primary_conninfo, write_restore_settings
from drkit.progress import NoProgress, Progress
from drkit.repo.chain import Chain
from drkit.repo.manifest import Manifest
from drkit.repo.open import open_repository
from drkit.repo.repository import Repository
from drkit.repo.safety import check_manifest
from drkit.repo.wal_handover import handover_keys
from drkit.restore.delta import DeltaRestore, DeltaSummary, check_delta_target, remove_control
from drkit.restore.files import FileWriter
from drkit.restore.paths import TargetTree, cluster_user
from drkit.restore.request import RestoreRequest, check_target, wal_fetch_command
from drkit.restore.start import start_command_in_background
from drkit.restore.target import (
    TargetUnreachable,
    check_reachable,
    choose_backup,
    load_named_chain,
    newest_intact_chain,
)
from drkit.restore.trust import load_trust
from drkit.result import OperationResult


@dataclass
class RestoreResult(OperationResult):
    """A completed restore. Warnings: CopyFallback (an object read from another repository),
    RepositoryUnreachable (a repository that could not be used), BackupSkipped (a damaged
    newest backup passed over). ``phases``: plan (find the backup, read and check its chain,
    check the target and the directories), scan (a delta restore: clear the directories of
    what the backup does not have), compare (a delta restore: check the files found), write
    (fetch, decrypt, decompress, write and check every file, in parallel), finish (WAL
    directories, settings, ownership), sync."""

    label: str
    pgdata: Path
    files: int
    size: int
    tablespaces: dict[int, Path]
    start_command: str
    target: RecoveryTarget | None = None
    repo: str = ""  # the repository the backup was found in
    archive_mode: str = "off"
    delta: DeltaSummary | None = None  # a delta restore: what it changed
    standby: bool = False

    @property
    def fallbacks(self) -> list[str]:
        """What was read from elsewhere or passed over, and why (the warnings' messages)."""
        return [w.message for w in self.warnings]

    def _data(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "pgdata": str(self.pgdata),
            "files": self.files,
            "size": self.size,
            "tablespaces": {str(k): str(v) for k, v in self.tablespaces.items()},
            "start_command": self.start_command,
            "repo": self.repo,
            "target": None if self.target is None else _target_dict(self.target),
            "archive_mode": self.archive_mode,
            "standby": self.standby,
            "fallbacks": self.fallbacks,
            "delta": None if self.delta is None else self.delta.as_dict(),
        }


def restore_backup(
    settings: Settings, request: RestoreRequest, progress: Progress | None = None
) -> RestoreResult:
    """Restore ``request``'s backup (or the one its target needs) into ``request.pgdata``."""
    return RestoreOperation(settings, request, progress).run()


class RestoreOperation:
    def __init__(
        self, settings: Settings, request: RestoreRequest, progress: Progress | None = None
    ) -> None:
        self.settings = settings
        self.request = request
        self.progress = progress or NoProgress()

    def run(self) -> RestoreResult:
        try:
            return self._run()
        finally:
            gc.unfreeze()  # what _run() froze is collected again: a daemon restores many times

    def _run(self) -> RestoreResult:
        timing = OperationResult()
        warnings: list[DrkitWarning] = []
        with timing.phase("plan"):
            # Check the target, find the backup and read its chain from the first repository
            # that has it, check every manifest, and prove the archive reaches the target
            target = self.request.target
            if target is not None:
                check_target(target)
            if self.request.archive_mode not in ("off", "preserve"):
                raise ConfigError(
                    f"invalid archive mode '{self.request.archive_mode}'",
                    hint="'off' or 'preserve'",
                )
            if self.request.trust_timestamps and not self.request.delta:
                raise ConfigError(
                    "trusting timestamps is for a delta restore",
                    hint="add --delta, or leave out --trust-timestamps",
                )
            self._check_standby()
            repo, chain, repos = self.locate(warnings)
            # The manifests, then the plans, live as long as the restore: the cyclic collector
            # leaves them out of its scans (with 100,000 files, seconds of scanning otherwise)
            gc.freeze()
            manifest, label = chain.target, chain.target.label
            for member in chain.manifests.values():
                check_manifest(member)
            plans = chain.plan()
            gc.freeze()
            if target is not None:
                check_reachable(repo, manifest, target)

            # Check every directory before writing anything
            pgdata = self.request.pgdata.absolute()
            tablespaces = self._tablespace_targets(manifest)
            if self.request.delta:
                check_delta_target(pgdata, tablespaces)
            else:
                for directory in [pgdata, *tablespaces.values()]:
                    _require_empty(directory)
            user = cluster_user(pgdata, tablespaces)

        # How to start the copy, found while the restore runs
        start_command = start_command_in_background(
            manifest, pgdata, user, self.settings.postgres.bindir
        )
        tree = TargetTree(pgdata, tablespaces, user)
        directories = [(d.path, d.mode) for d in manifest.directories]
        writer = FileWriter(
            [repo, *(r for r in repos if r is not repo)],
            chain,
            tree,
            self.progress,
            direct=self.settings.backup.direct_io,
        )
        workers = self.settings.backup.process_max
        delta: DeltaSummary | None = None
        try:
            if self.request.delta:
                with timing.phase("scan"):
                    # Remove what the backup does not have, lay its directories over what is
                    # left, note the files found
                    existing = DeltaRestore(pgdata, tablespaces, plans, [d for d, _ in directories])
                    trust = None
                    if self.request.trust_timestamps:  # before clear() removes backup_label.old
                        trust = load_trust(repo, manifest, pgdata)
                    existing.clear()
                    tree.make(directories)
                with timing.phase("compare"):
                    # Compare each file found with its entry
                    work = existing.compare(tree, workers, self.settings.backup.direct_io, trust)
                    plans, in_place, last, delta = work.plans, work.chunks, work.last, work.summary
            else:
                tree.make(directories)
                in_place, last = {}, None

            with timing.phase("write"):
                # Write the files (a delta restore: those that differ, global/pg_control aside)
                self.progress.start(
                    f"restore {label}", manifest.stats.size if delta is None else delta.written
                )
                writer.write(plans, workers, in_place)
                self.progress.stop()

            with timing.phase("finish"):
                # WAL directories, settings, then (delta) global/pg_control, then ownership
                for sub in ("pg_wal", "pg_wal/archive_status", "pg_wal/summaries"):
                    tree.ensure_dir(sub)
                restore_command, end_command = "", ""
                if target is not None or self.request.standby is not None:
                    restore_command, end_command = self._recovery_commands(repos, manifest, tree)
                write_restore_settings(
                    tree.root,
                    archive_off=self.request.archive_mode == "off",
                    restore_command=restore_command,
                    recovery_end_command=end_command,
                    target=target,
                    standby=self.request.standby,
                    init_sync=manifest.pg_major >= 14 and sys.platform == "linux",
                )
                if last is not None:
                    writer.write([last], 1)
                tree.set_ownership(kept=self.request.delta)
            warnings += writer.warnings

            with timing.phase("sync"):
                tree.sync()
        except BaseException as exc:
            with uninterruptible():  # a second Ctrl-C does not cut the undo short
                self.progress.stop()
                tree.stop()  # workers an interruption abandoned create nothing from here on
                left_behind = self._undo(tree, pgdata, tablespaces)
            if isinstance(exc, Interrupted):
                exc.left_behind = left_behind
            if isinstance(exc, OSError):  # the target's file system refused (full, read-only)
                raise RestoreTargetError(
                    f"unable to restore to path '{pgdata}': {os_reason(exc)}",
                    hint=f"the backup needs {manifest.stats.size} bytes: free space on the"
                    " target's file system (or restore elsewhere), then run the restore again"
                    + (" (until then the directory does not start)" if self.request.delta else ""),
                ) from None
            raise
        finally:
            tree.close()
        return RestoreResult(
            label=str(label),
            pgdata=pgdata,
            files=len(manifest.files),
            size=manifest.stats.size,
            tablespaces=tablespaces,
            start_command=start_command(),
            target=target,
            repo=repo.name,
            archive_mode=self.request.archive_mode,
            delta=delta,
            standby=self.request.standby is not None,
            warnings=warnings,
            phases=timing.phases,
        )

    def _undo(self, tree: TargetTree, pgdata: Path, tablespaces: dict[int, Path]) -> str:
        """Never leave a half-restored cluster that someone could start. A restore into empty
        directories empties them again, losing nothing; a delta restore leaves the directory
        without global/pg_control (written last), so it starts only once a restore completes.
        Returns what it left, in words."""
        if not self.request.delta:
            for directory in [pgdata, *tablespaces.values()]:
                _empty(directory)
            tree.remove_created()
            also = " and its tablespace directories" if tablespaces else ""
            return f"what it had written to '{pgdata}'{also} was removed"
        if tree.made:
            remove_control(tree.root)
        return f"'{pgdata}' does not start until a restore completes (pg_control comes last)"

    def _check_standby(self) -> None:
        standby = self.request.standby
        if standby is None:
            return
        if self.request.target is not None:
            raise ConfigError(
                "a standby has no recovery target: it follows its primary until promoted",
                hint="leave out --target-*, or restore without --type standby",
            )
        if standby.primary_conninfo:
            check_primary_conninfo(standby.primary_conninfo)

    def _recovery_commands(
        self, repos: list[Repository], manifest: Manifest, tree: TargetTree
    ) -> tuple[str, str]:
        """``restore_command`` and ``recovery_end_command``: the caller's restore_command, or
        drkit wal-fetch; with a repository asked for, that wal-fetch reads only it (the others
        may be the ones the disaster took, and wal-fetch never takes a repository that is not
        there for the end of the archive). With the recovery key, recovery gets only the WAL
        period keys it can need, in a 0600 file of the restored directory that the cluster's
        user owns and that recovery removes when it ends: never the recovery key itself
        (crypto/walkeys.py)."""
        if self.request.restore_command is not None:
            return self.request.restore_command, ""
        config = config_path(self.request.config)
        only = self.request.wal_repos
        if only is None and self.request.repo:
            only = [self.request.repo]
        # The fetch spool's parent as wal-fetch finds it, when the configuration sets it: the
        # default lock path is the server user's, not this process's.
        spool_root = self.settings.archive.spool_path
        if spool_root is None and "lock_path" in self.settings.model_fields_set:
            spool_root = self.settings.lock_path
        if self.settings.keys.recovery_key is None:
            return wal_fetch_command(config, repos=only, spool_root=spool_root), ""
        keys = handover_keys(repos, manifest.start_time)
        tree.unlink(WAL_KEYS_FILE)  # a delta restore's target may hold an older one
        fd = tree.open(WAL_KEYS_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "wb") as file:
            file.write(wal_keys_document(keys))
        command = wal_fetch_command(
            config, repos=only, wal_keys=WAL_KEYS_FILE, spool_root=spool_root
        )
        return command, f"rm -f {WAL_KEYS_FILE}"

    def locate(self, warnings: list[DrkitWarning]) -> tuple[Repository, Chain, list[Repository]]:
        """The repository the restore reads first, the chain it restores, and every repository
        in the order they are tried; ``warnings`` gets the repositories and backups passed over.
        Reads nothing but manifests and key records (``restore --plan`` stops here)."""
        repos = self._repositories()
        repo, chain = self._load_chain(repos, warnings)
        return repo, chain, repos

    def _repositories(self) -> list[Repository]:
        """The requested (or primary) repository first, then the others in configured order."""
        names = [self.request.repo] if self.request.repo else []
        names += [r.name for r in self.settings.repo if r.name not in names]
        return [open_repository(self.settings, name) for name in names]

    def _load_chain(
        self, repos: list[Repository], events: list[DrkitWarning]
    ) -> tuple[Repository, Chain]:
        """The chain to restore, from the first repository that has it intact. Without a backup
        or target asked for, that is the newest backup; when no repository has it intact, the
        newest backup that restores (a damaged newest one never hides the older ones)."""
        first_pass: list[DrkitWarning] = []
        try:
            found = self._find_chain(repos, first_pass, skip_damaged=False)
        except DrkitError:
            if self.request.backup not in (None, "latest") or self.request.target is not None:
                raise
            # The second pass says again what is unusable, and which backups it passed over
            return self._find_chain(repos, events, skip_damaged=True)
        events += first_pass
        return found

    def _find_chain(
        self, repos: list[Repository], events: list[DrkitWarning], *, skip_damaged: bool
    ) -> tuple[Repository, Chain]:
        first_error: DrkitError | None = None
        for repo in repos:
            try:
                repo.check(reading=True)
                target = self.request.target
                if target is not None and self.request.backup is None:
                    label = choose_backup(repo, target)
                elif skip_damaged:
                    return repo, newest_intact_chain(repo, events)
                else:
                    label = repo.resolve(self.request.backup)
                return repo, load_named_chain(repo, label)
            except DrkitError as exc:
                if isinstance(exc, TargetUnreachable | ConfigError):
                    raise
                first_error = first_error or exc
                events.append(
                    RepositoryUnreachable(f"repository '{repo.name}' could not be used: {exc}")
                )
        assert first_error is not None
        raise first_error

    def _tablespace_targets(self, manifest: Manifest) -> dict[int, Path]:
        """Where each tablespace goes: only where the operator said (--tablespace-map), or where
        the backup says when the operator confirmed that (--tablespace-map-all)."""
        wanted = dict(self.request.tablespace_map)
        targets: dict[int, Path] = {}
        unconfirmed = []
        for ts in manifest.tablespaces:
            chosen = wanted.pop(str(ts.oid), None) or wanted.pop(ts.name, None)
            if chosen is None and self.request.tablespace_map_all:
                chosen = _recorded_location(manifest, ts.location)
            if chosen is None:
                unconfirmed.append(f"{ts.oid} ({ts.name}) at '{ts.location}'")
                continue
            targets[ts.oid] = chosen.absolute()
        known = ", ".join(f"{t.oid} ({t.name})" for t in manifest.tablespaces) or "none"
        if wanted:
            raise ConfigError(
                f"--tablespace-map names unknown tablespaces: {', '.join(sorted(wanted))}",
                hint=f"tablespaces in backup '{manifest.label}': {known}",
            )
        if unconfirmed:
            raise ConfigError(
                f"backup '{manifest.label}' has tablespaces with no confirmed location:"
                f" {'; '.join(unconfirmed)}",
                hint="give each one a directory with --tablespace-map OID=DIR (or NAME=DIR), or"
                " pass --tablespace-map-all to restore them where the backup says",
            )
        return targets


def _require_empty(target: Path) -> None:
    try:
        if not target.exists():
            return
        if not target.is_dir():
            raise RestoreTargetError(
                f"unable to restore to '{target}' because it is not a directory"
            )
        occupied = any(target.iterdir())
    except OSError as exc:  # a parent this user cannot search, an unreadable target
        raise RestoreTargetError(
            f"unable to restore to path '{target}': {os_reason(exc)}",
            hint="restore as a user who can enter every directory above it and write in its"
            " parent (the user the restored server will run as)",
        ) from None
    if occupied:
        raise RestoreTargetError(
            f"unable to restore to path '{target}' because it contains files",
            hint="restore into an empty or new directory (or remap tablespaces with"
            " --tablespace-map OID=DIR)",
        )


def _empty(target: Path) -> None:
    if not target.is_dir():
        return
    for child in target.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _recorded_location(manifest: Manifest, location: str) -> Path:
    path = PurePosixPath(location)
    if not path.is_absolute() or ".." in path.parts or str(path) != location:
        raise UnsafeManifest(
            f"backup '{manifest.label}' records tablespace location '{location}', which is not a"
            " normalised absolute path",
            hint="give every tablespace a directory with --tablespace-map OID=DIR",
        )
    return Path(location)


def _target_dict(target: RecoveryTarget) -> dict[str, Any]:
    return {
        "kind": target.kind.value,
        "value": target.value,
        "action": target.action.value,
        "timeline": target.timeline,
        "inclusive": target.inclusive,
    }
