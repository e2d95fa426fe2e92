"""Walk PGDATA (and tablespaces) and list what a physical backup must copy.

Exclusions follow PostgreSQL's documentation of base backups (and pg_basebackup's lists): the
contents of pg_wal, pg_replslot, pg_dynshmem, pg_notify, pg_serial, pg_snapshots, pg_stat_tmp
and pg_subtrans are skipped (the directories themselves are kept); postmaster.pid,
postmaster.opts, pg_internal.init, temporary files (pgsql_tmp*), stale backup_label /
tablespace_map / recovery signal files are skipped; unlogged relations keep only their init fork
(PostgreSQL recreates the main fork from it at the end of recovery).

Paths are PGDATA-relative with '/' separators. Tablespace files are listed under
``pg_tblspc/<oid>/<PG_major_catversion>/...`` like PostgreSQL addresses them.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

EXCLUDE_CONTENTS = frozenset(
    {
        "pg_wal",
        "pg_replslot",
        "pg_dynshmem",
        "pg_notify",
        "pg_serial",
        "pg_snapshots",
        "pg_stat_tmp",
        "pg_subtrans",
    }
)
EXCLUDE_FILES = frozenset(
    {
        "postmaster.pid",
        "postmaster.opts",
        "postgresql.auto.conf.tmp",
        "current_logfiles.tmp",
        "backup_label",
        "backup_label.old",
        "tablespace_map",
        "tablespace_map.old",
        "recovery.signal",
        "standby.signal",
        "drkit-wal-keys.json",  # WAL keys a restore handed to recovery: never backed up
    }
)
EXCLUDE_ANYWHERE = frozenset({"pg_internal.init"})
_UNLOGGED_INIT = re.compile(r"^(\d+)_init$")
_RELATION = re.compile(r"^(\d+)(_(fsm|vm|init))?(\.\d+)?$")
_DB_DIR = re.compile(r"^(base/\d+|pg_tblspc/\d+/[^/]+/\d+)$")


@dataclass(frozen=True)
class SourceFile:
    path: str  # PGDATA-relative
    abspath: Path
    size: int
    mtime: float
    mode: int


@dataclass(frozen=True)
class SourceDir:
    path: str
    mode: int


@dataclass(frozen=True)
class SourceLink:
    path: str
    target: str


@dataclass
class PgdataListing:
    files: list[SourceFile]
    dirs: list[SourceDir]
    links: list[SourceLink]  # symlinks other than tablespaces, restored as symlinks
    tablespace_dirs: dict[int, Path]  # oid -> directory the pg_tblspc link points to


def walk_pgdata(pgdata: Path, tablespace_version_dir: str) -> PgdataListing:
    """List PGDATA. ``tablespace_version_dir`` is e.g. 'PG_15_202209061' (only that subdirectory
    of a tablespace belongs to this cluster's major version)."""
    listing = PgdataListing(files=[], dirs=[], links=[], tablespace_dirs={})
    _walk(pgdata, "", listing, tablespace_version_dir)
    listing.files.sort(key=lambda f: f.path)
    listing.dirs.sort(key=lambda d: d.path)
    return listing


def _walk(directory: Path, rel: str, listing: PgdataListing, version_dir: str) -> None:
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except FileNotFoundError:
        return  # a directory dropped while we walk (DROP DATABASE); WAL replay settles it
    unlogged = _unlogged_relations(entries) if _DB_DIR.match(rel) else set()
    for entry in entries:
        path = f"{rel}/{entry.name}" if rel else entry.name
        if excluded(rel, entry.name, unlogged):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            _walk_link(entry, path, listing, version_dir)
        elif stat.S_ISDIR(st.st_mode):
            listing.dirs.append(SourceDir(path, stat.S_IMODE(st.st_mode)))
            if path not in EXCLUDE_CONTENTS and not entry.name.startswith("pgsql_tmp"):
                _walk(Path(entry.path), path, listing, version_dir)
        elif stat.S_ISREG(st.st_mode):
            listing.files.append(
                SourceFile(
                    path, Path(entry.path), st.st_size, st.st_mtime, stat.S_IMODE(st.st_mode)
                )
            )


def _walk_link(
    entry: os.DirEntry[str], path: str, listing: PgdataListing, version_dir: str
) -> None:
    target = os.readlink(entry.path)
    parent, _, name = path.rpartition("/")
    if parent == "pg_tblspc" and name.isdigit():
        location = Path(entry.path).resolve()
        listing.tablespace_dirs[int(name)] = location
        # Only this major version's directory belongs to us; a tablespace location may hold
        # another cluster version's directory side by side (pg_upgrade).
        versioned = location / version_dir
        if versioned.is_dir():
            vpath = f"{path}/{version_dir}"
            listing.dirs.append(SourceDir(vpath, stat.S_IMODE(versioned.stat().st_mode)))
            _walk(versioned, vpath, listing, version_dir)
    elif path == "pg_wal":
        listing.dirs.append(SourceDir(path, 0o700))  # WAL on another disk: keep an empty pg_wal
    else:
        listing.links.append(SourceLink(path, target))


def excluded(rel: str, name: str, unlogged: set[str]) -> bool:
    if name in EXCLUDE_ANYWHERE or name.startswith("pgsql_tmp"):
        return True
    if rel == "" and name in EXCLUDE_FILES:
        return True
    if unlogged:
        match = _RELATION.match(name)
        if match and match.group(1) in unlogged and match.group(3) != "init":
            return True
    return False


def _unlogged_relations(entries: list[os.DirEntry[str]]) -> set[str]:
    return {m.group(1) for e in entries if (m := _UNLOGGED_INIT.match(e.name))}
