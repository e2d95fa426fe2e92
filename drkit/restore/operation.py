"""Restore a backup into an empty directory, checking every file's checksum as it is written.

The restored directory holds backup_label and the WAL from the backup's start to its stop in
pg_wal, so PostgreSQL replays exactly that WAL at startup and comes up consistent without any
archive. Tablespaces are restored as pg_tblspc symlinks to their (optionally remapped) directories,
the way pg_basebackup's plain format does it, so no tablespace_map is needed.
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from drkit.config.settings import Settings
from drkit.errors import ConfigError, DrkitError, IntegrityError, RestoreTargetError
from drkit.pg.recovery import RecoveryTarget, write_recovery_config
from drkit.progress import NoProgress, Progress
from drkit.repo.chain import Chain
from drkit.repo.manifest import Manifest
from drkit.repo.open import open_repository
from drkit.repo.repository import Repository
from drkit.restore.files import FileWriter
from drkit.restore.target import TargetUnreachable, check_reachable, choose_backup


@dataclass
class RestoreRequest:
    pgdata: Path
    backup: str | None = None  # label or 'latest'
    repo: str | None = None
    tablespace_map: dict[str, Path] = field(default_factory=dict)  # oid or name -> directory
    target: RecoveryTarget | None = None  # None: stop where the backup is consistent
    restore_command: str = ""  # how the restored cluster fetches archived WAL (with a target)


@dataclass
class RestoreResult:
    label: str
    pgdata: Path
    files: int
    size: int
    tablespaces: dict[int, Path]
    start_command: str
    target: RecoveryTarget | None = None
    repo: str = ""  # the repository the backup was found in
    fallbacks: list[str] = field(default_factory=list)  # objects read from another copy, and why


class RestoreOperation:
    def __init__(
        self, settings: Settings, request: RestoreRequest, progress: Progress | None = None
    ) -> None:
        self.settings = settings
        self.request = request
        self.progress = progress or NoProgress()

    def run(self) -> RestoreResult:
        # Find the backup and read its chain, from the first repository that has it
        target = self.request.target
        repos, events = self._repositories()
        repo, chain = self._load_chain(repos, events)
        manifest, label = chain.target, chain.target.label
        plans = chain.plan()
        if target is not None:
            check_reachable(repo, manifest, target)

        # Check every target before writing anything
        pgdata = self.request.pgdata.absolute()
        tablespaces = self._tablespace_targets(manifest)
        for directory in [pgdata, *tablespaces.values()]:
            _require_empty(directory)

        try:
            # Lay out directories and tablespace links, then write the files
            self._make_directories(manifest, pgdata, tablespaces)
            self.progress.start(f"restore {label}", manifest.stats.size)
            writer = FileWriter(
                [repo, *(r for r in repos if r is not repo)], chain, pgdata, self.progress
            )
            writer.write(plans, self.settings.backup.process_max)
            events += writer.events
            self.progress.stop()

            # Finish: links, WAL directories, ownership, and make it all durable
            for link in manifest.links:
                os.symlink(link.target, pgdata / _safe(link.path))
            for sub in ("pg_wal/archive_status", "pg_wal/summaries"):
                (pgdata / sub).mkdir(mode=0o700, exist_ok=True)
            if target is not None:
                write_recovery_config(pgdata, self.request.restore_command, target)
            self._set_ownership(manifest, pgdata, tablespaces)
            os.sync()  # one call flushes every file written, far cheaper than an fsync per file
        except BaseException:
            # Never leave a half-restored cluster that someone could start: the targets were
            # empty when we began, so emptying them again loses nothing.
            self.progress.stop()
            for directory in [pgdata, *tablespaces.values()]:
                _empty(directory)
            raise
        return RestoreResult(
            label=str(label),
            pgdata=pgdata,
            files=len(manifest.files),
            size=manifest.stats.size,
            tablespaces=tablespaces,
            start_command=_start_command(manifest, pgdata),
            target=target,
            repo=repo.name,
            fallbacks=events,
        )

    def _repositories(self) -> tuple[list[Repository], list[str]]:
        """The requested (or primary) repository first, then the others in configured order."""
        names = [self.request.repo] if self.request.repo else []
        names += [r.name for r in self.settings.repo if r.name not in names]
        return [open_repository(self.settings, name) for name in names], []

    def _load_chain(self, repos: list[Repository], events: list[str]) -> tuple[Repository, Chain]:
        first_error: DrkitError | None = None
        for repo in repos:
            try:
                repo.check()
                target = self.request.target
                if target is not None and self.request.backup is None:
                    label = choose_backup(repo, target)
                else:
                    label = repo.resolve(self.request.backup)
                return repo, Chain.load(repo, label)
            except DrkitError as exc:
                if isinstance(exc, TargetUnreachable | ConfigError):
                    raise
                first_error = first_error or exc
                events.append(f"repository '{repo.name}' could not be used: {exc}")
        assert first_error is not None
        raise first_error

    def _tablespace_targets(self, manifest: Manifest) -> dict[int, Path]:
        wanted = dict(self.request.tablespace_map)
        targets: dict[int, Path] = {}
        for ts in manifest.tablespaces:
            chosen = wanted.pop(str(ts.oid), None) or wanted.pop(ts.name, None)
            targets[ts.oid] = (chosen or Path(ts.location)).absolute()
        if wanted:
            known = ", ".join(f"{t.oid} ({t.name})" for t in manifest.tablespaces) or "none"
            raise ConfigError(
                f"--tablespace-map names unknown tablespaces: {', '.join(sorted(wanted))}",
                hint=f"tablespaces in backup '{manifest.label}': {known}",
            )
        return targets

    def _make_directories(
        self, manifest: Manifest, pgdata: Path, tablespaces: dict[int, Path]
    ) -> None:
        pgdata.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(pgdata, 0o700)
        (pgdata / "pg_tblspc").mkdir(mode=0o700, exist_ok=True)
        for oid, target in tablespaces.items():
            target.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.symlink(target, pgdata / "pg_tblspc" / str(oid))
        for directory in manifest.directories:
            path = pgdata / _safe(directory.path)
            path.mkdir(mode=0o700, exist_ok=True)
            os.chmod(path, directory.mode)

    def _set_ownership(
        self, manifest: Manifest, pgdata: Path, tablespaces: dict[int, Path]
    ) -> None:
        """Running as root, give the files to the user that owned the source PGDATA."""
        if os.geteuid() != 0:
            return
        try:
            uid = pwd.getpwnam(manifest.owner).pw_uid
            gid = grp.getgrnam(manifest.group).gr_gid
        except KeyError:
            return
        for root in [pgdata, *tablespaces.values()]:
            os.chown(root, uid, gid)
            for dirpath, dirnames, filenames in os.walk(root):
                for name in dirnames + filenames:
                    os.lchown(os.path.join(dirpath, name), uid, gid)


def _require_empty(target: Path) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise RestoreTargetError(f"unable to restore to '{target}' because it is not a directory")
    if any(target.iterdir()):
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


def _safe(path: str) -> str:
    """Defence in depth: manifest paths are authenticated, still never leave the target."""
    parts = PurePosixPath(path).parts
    if not parts or path.startswith("/") or ".." in parts:
        raise IntegrityError(f"manifest holds an unsafe path '{path}'")
    return path


def _start_command(manifest: Manifest, pgdata: Path) -> str:
    pg_ctl = Path(f"/usr/lib/postgresql/{manifest.pg_major}/bin/pg_ctl")
    binary = str(pg_ctl) if pg_ctl.exists() else "pg_ctl"
    log = shlex.quote(str(pgdata / "restore.log"))
    command = f"{binary} -D {shlex.quote(str(pgdata))} -l {log} start"
    if os.geteuid() == 0:
        command = f"runuser -u {shlex.quote(manifest.owner)} -- {command}"
    return command
