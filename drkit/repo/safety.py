"""A manifest as a restore contract it is safe to carry out: every entry checked against what a
PostgreSQL data directory can hold (pg/layout.py) before one byte is written. ``drkit verify``
reports the same problems, so a hostile or forged manifest is found before anyone restores it.
"""

from __future__ import annotations

import re

from drkit.errors import UnsafeManifest
from drkit.pg.layout import mode_problem, path_problem
from drkit.repo.manifest import Manifest

_TABLESPACE_LINK = re.compile(r"pg_tblspc/[0-9]+")
SHOWN = 5  # problems named in an error; verify lists them all


def manifest_problems(manifest: Manifest) -> list[str]:
    """Every entry of ``manifest`` a restore would refuse, as "'path': why"."""
    problems = [f"'{link.path}': a symbolic link (to '{link.target}')" for link in manifest.links]
    oids: set[int] = set()
    for ts in manifest.tablespaces:
        if ts.oid <= 0 or ts.oid in oids:
            problems.append(f"tablespace {ts.oid}: not a valid tablespace oid")
        oids.add(ts.oid)
    directories = {d.path for d in manifest.directories}
    seen: set[str] = set()
    entries = [(d.path, d.mode, True) for d in manifest.directories]
    entries += [(f.path, f.mode, False) for f in manifest.files]
    for path, mode, is_dir in entries:
        parent = path.rpartition("/")[0]
        listed = parent == "" or parent in directories or bool(_TABLESPACE_LINK.fullmatch(parent))
        why = path_problem(path, is_dir, listed, oids) or mode_problem(mode)
        if not why and path in seen:
            why = "listed twice"
        seen.add(path)
        if why:
            problems.append(f"'{path}': {why}")
    return problems


def check_manifest(manifest: Manifest) -> None:
    """Raise UnsafeManifest naming the first problems of ``manifest``, if it has any."""
    problems = manifest_problems(manifest)
    if not problems:
        return
    more = f" (and {len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
    raise UnsafeManifest(
        f"backup '{manifest.label}' asks for what no PostgreSQL data directory holds:"
        f" {'; '.join(problems[:SHOWN])}{more}",
        hint="nothing was written; this manifest was not made by a drkit backup of a real"
        " cluster (tampering, or a stolen key): restore another backup and investigate",
    )
