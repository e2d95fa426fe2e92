"""What a PostgreSQL data directory holds, as a restore accepts it from a manifest.

A manifest is authenticated, but whoever can make one (a stolen key, a forged escrow backup)
must still not be able to write outside the target or plant something PostgreSQL would run. So
every entry is checked against what ``pg/walk.py`` can ever record from a real PGDATA:

- paths are relative, normalised, '/'-separated, without '.', '..', empty or control characters;
- each entry's parent is PGDATA itself or a directory the manifest lists, so every directory is
  created by the restore before anything is written into it (no entry lands under a link);
- PostgreSQL's own top-level names have their kind (``base`` is a directory, ``PG_VERSION`` a
  file); an operator's extra top-level files and directories (configuration includes,
  certificates) are accepted as plain files and directories with plain names;
- ``pg_tblspc`` holds only ``<oid>`` of a listed tablespace, each holding only its
  ``PG_<major>_<catalog version>`` directory; ``pg_wal`` only WAL file names and its two
  subdirectories;
- no symbolic links (drkit makes the ``pg_tblspc`` links itself, to directories the operator
  confirmed) and no setuid, setgid or sticky bits.

Modes are then restored the way PostgreSQL makes them: 0700 or 0750 for directories, 0600 or
0640 for files (group read kept for clusters initialised with group access), nothing else.
"""

from __future__ import annotations

import re
import stat

PG_DIRECTORIES = frozenset(
    {
        "base",
        "global",
        "pg_commit_ts",
        "pg_dynshmem",
        "pg_logical",
        "pg_multixact",
        "pg_notify",
        "pg_replslot",
        "pg_serial",
        "pg_snapshots",
        "pg_stat",
        "pg_stat_tmp",
        "pg_subtrans",
        "pg_tblspc",
        "pg_twophase",
        "pg_wal",
        "pg_xact",
    }
)
PG_FILES = frozenset(
    {
        "PG_VERSION",
        "postgresql.conf",
        "postgresql.auto.conf",
        "pg_hba.conf",
        "pg_ident.conf",
        "current_logfiles",
    }
)
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.,+@=~-]*")
_VERSION_DIR = re.compile(r"PG_[0-9]+_[0-9]+")
_WAL_FILE = re.compile(r"[0-9A-F]{24}(\.partial|\.[0-9A-F]{8}\.backup)?|[0-9A-F]{8}\.history")
_SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX


def path_problem(path: str, is_dir: bool, parent_listed: bool, tablespaces: set[int]) -> str:
    """Why ``path`` (a file, or a directory when ``is_dir``) cannot be in a PGDATA, or ''.
    ``parent_listed``: the manifest lists the parent directory (PGDATA itself always is)."""
    if not path or "\x00" in path or len(path) > 1024:
        return "not a path"
    if path.startswith("/"):
        return "an absolute path"
    parts = path.split("/")
    if "" in parts or "." in parts or ".." in parts:  # per entry of a 100,000-file manifest
        return "not a normalised relative path"
    if not path.isprintable():  # '/' is printable: the same as asking each name
        return "a name with control characters"
    if len(parts) > 1 and not parent_listed:
        return "its parent directory is not in the backup"
    top = parts[0]
    if top in PG_FILES:
        return "" if len(parts) == 1 and not is_dir else "not where PostgreSQL keeps it"
    if top == "pg_tblspc":
        return _tablespace_problem(parts, is_dir, tablespaces)
    if top == "pg_wal":
        return _wal_problem(parts, is_dir)
    if top in PG_DIRECTORIES:
        return "" if is_dir or len(parts) > 1 else "a file where PostgreSQL keeps a directory"
    if len(parts) == 1 and not _NAME.fullmatch(top):
        return "not a plain file or directory name"
    return ""


def _tablespace_problem(parts: list[str], is_dir: bool, tablespaces: set[int]) -> str:
    if len(parts) == 1:
        return "" if is_dir else "a file where PostgreSQL keeps a directory"
    oid = parts[1]
    if not oid.isdigit() or int(oid) not in tablespaces:
        return "not a tablespace of the backup"
    if len(parts) == 2:
        return "a tablespace link is made by the restore, not taken from the backup"
    if not _VERSION_DIR.fullmatch(parts[2]) or (len(parts) == 3 and not is_dir):
        return "not a tablespace version directory"
    return ""


def _wal_problem(parts: list[str], is_dir: bool) -> str:
    if len(parts) == 1:
        return "" if is_dir else "a file where PostgreSQL keeps a directory"
    if len(parts) == 2 and is_dir:
        return "" if parts[1] in ("archive_status", "summaries") else "not a WAL directory"
    if len(parts) == 2 and _WAL_FILE.fullmatch(parts[1]):
        return ""
    return "not a WAL file"


def mode_problem(mode: int) -> str:
    """Why a recorded mode cannot be restored, or ''."""
    if mode < 0 or mode > 0o7777:
        return f"mode {mode:o} is not a permission mode"
    if mode & _SPECIAL_BITS:
        return f"mode {mode:04o} has setuid, setgid or sticky bits"
    return ""


def restored_mode(mode: int, is_dir: bool) -> int:
    """The mode PostgreSQL itself would give the entry: owner only, or group read (and search)
    for a cluster initialised with group access; never write for others, never execute a file."""
    group = mode & stat.S_IRGRP
    if is_dir:
        return 0o750 if group else 0o700
    return 0o640 if group else 0o600
