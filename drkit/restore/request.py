"""What a restore is asked to do: the typed request, and the recovery target read from text.

The CLI and a drill fill the same ``RestoreRequest``; a target given as text (``--target-time``,
a runbook's value) is turned into a checked ``RecoveryTarget`` by ``recovery_target()``, so a bad
time, LSN or XID is refused before anything is read or written.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from drkit.errors import ConfigError
from drkit.pg.recovery import RecoveryTarget, Standby, TargetAction, TargetKind
from drkit.pg.wal import parse_lsn


@dataclass
class RestoreRequest:
    pgdata: Path
    backup: str | None = None  # label or 'latest'; None: the latest, or the newest before target
    repo: str | None = None  # tried first; the others follow in configured order
    tablespace_map: dict[str, Path] = field(default_factory=dict)  # oid or name -> directory
    target: RecoveryTarget | None = None  # None: stop where the backup is consistent
    # The drkit.toml the restored cluster's restore_command reads (None: $DRKIT_CONFIG or the
    # default), and the restore_command itself when a caller wants another (None: drkit wal-fetch)
    config: Path | None = None
    restore_command: str | None = None
    tablespace_map_all: bool = False  # restore unmapped tablespaces where the backup says
    archive_mode: str = "off"  # 'off': the copy never archives; 'preserve': the source's setting
    # Bring an existing (stopped) data directory to the backup, writing only the files that
    # differ and removing those the backup does not have (restore/delta.py); a drill can reuse
    # its kept sandbox this way
    delta: bool = False
    # With delta: keep a file whose size and mtime are the backup's without reading it
    # (restore/trust.py); faster, but a file changed without a new mtime stays unproven
    trust_timestamps: bool = False
    standby: Standby | None = None  # a standby following a primary instead of a copy that opens
    # The repositories drkit wal-fetch in restore_command reads, in that order ([]: every
    # configured one); None: only ``repo`` when one is asked for, else every configured one
    wal_repos: list[str] | None = None


def recovery_target(
    *,
    time: str | None = None,
    lsn: str | None = None,
    xid: str | None = None,
    name: str | None = None,
    latest: bool = False,
    immediate: bool = False,
    action: TargetAction = TargetAction.PROMOTE,
    timeline: str = "latest",
    exclusive: bool = False,
) -> RecoveryTarget | None:
    """The one target given (None for none), checked; ConfigError for several or a bad value."""
    chosen = {
        TargetKind.TIME: time,
        TargetKind.LSN: lsn,
        TargetKind.XID: xid,
        TargetKind.NAME: name,
        TargetKind.LATEST: "latest" if latest else None,
        TargetKind.IMMEDIATE: "immediate" if immediate else None,
    }
    given = [(kind, value) for kind, value in chosen.items() if value is not None]
    if len(given) > 1:
        raise ConfigError("give at most one recovery target (--target-time, --target-lsn, ...)")
    if not given:
        return None
    kind, value = given[0]
    target = RecoveryTarget(kind, value, action, timeline, inclusive=not exclusive)
    check_target(target)
    return target


def check_target(target: RecoveryTarget) -> None:
    """ConfigError when the target's value is not a time with a zone, an LSN or an XID as its
    kind says, or its timeline is not 'latest', 'current' or a number."""
    try:
        if target.kind is TargetKind.TIME:
            _ = target.time
        elif target.kind is TargetKind.LSN:
            parse_lsn(target.value)
        elif target.kind is TargetKind.XID:
            int(target.value)
    except ValueError as exc:
        raise ConfigError(
            f"invalid recovery target {target.kind} '{target.value}': {exc}"
        ) from None
    if target.timeline not in ("latest", "current") and not target.timeline.isdigit():
        raise ConfigError(
            f"invalid recovery target timeline '{target.timeline}'",
            hint="give 'latest', 'current' or a timeline number",
        )


def parse_tablespace_map(values: list[str]) -> dict[str, Path]:
    """``OID=DIR`` / ``NAME=DIR`` pairs as a mapping; ConfigError for anything else."""
    mapping: dict[str, Path] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or not name or not directory:
            raise ConfigError(f"--tablespace-map '{value}' is not OID=DIR or NAME=DIR")
        mapping[name] = Path(directory)
    return mapping


# The quick path of 'wal-fetch --prefetch', run as a file by an interpreter without site-packages
QUICK_FETCH = Path(__file__).resolve().parent.parent / "wal" / "quick.py"


def wal_fetch_command(
    config: Path,
    repos: list[str] | None = None,
    *,
    wal_keys: str | None = None,
    spool_root: Path | None = None,
) -> str:
    """The restore_command a restored cluster uses to fetch WAL from the repositories: this
    installation's drkit, with the configuration the restore used (and the WAL keys file a
    restore with the recovery key wrote: never the recovery key itself), reading only ``repos``
    (in that order) when given, fetching ahead ([archive] fetch_ahead) in the background.
    Behind its quick path (drkit/wal/quick.py), which takes a segment the background fetcher
    has ready in milliseconds and otherwise runs that drkit command; ``spool_root``: where the
    configuration puts the spool, when it says (None: the server user's default lock path)."""
    drkit = Path(sys.executable).parent / "drkit"
    full = f"{shlex.quote(str(drkit))} wal-fetch --prefetch --config {shlex.quote(str(config))}"
    if wal_keys is not None:
        full += f" --wal-keys {shlex.quote(wal_keys)}"
    for name in repos or []:
        full += f" --repo {shlex.quote(name)}"
    quick = [sys.executable, "-I", "-S", str(QUICK_FETCH)]
    if spool_root is not None:
        quick += ["--spool-root", str(spool_root)]
    return f"{shlex.join(quick)} -- {full} %f %p"
