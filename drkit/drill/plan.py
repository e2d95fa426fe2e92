"""The drill's plan: which repositories the disaster leaves, which point to restore, and why.

``surviving_settings`` narrows the settings to the repositories a scenario says survive (by name,
offsite only, Object Lock only) and, when Vault is lost, swaps the key provider for the escrow
recovery key, so that the restore and its restore_command cannot touch anything the disaster
took. ``choose_restore_point`` turns the request (or the scenario) into a backup label and a
recovery target, with the reason the drill prints and records.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from drkit.config.settings import S3Repo, Settings
from drkit.drill.scenario import RestorePointSpec, Survivors
from drkit.errors import ConfigError, DrillRestoreFailed
from drkit.pg.recovery import RecoveryTarget, TargetKind
from drkit.pg.wal import format_lsn, parse_segment_name, segment_name
from drkit.repo.manifest import Manifest
from drkit.repo.repository import Repository
from drkit.repo.wal_archive import WalArchive
from drkit.restore.request import recovery_target
from drkit.restore.target import choose_backup


@dataclass(frozen=True)
class RestorePlan:
    backup: str | None  # the label asked for (None: the one the target needs)
    target: RecoveryTarget
    reason: str
    time: datetime | None = None  # the random instant the target stands for (--random)


def surviving_settings(settings: Settings, survivors: Survivors) -> Settings:
    """``settings`` with only the surviving repositories, in configured order, and with the
    recovery key as the only key provider when the scenario loses Vault."""
    repos = list(settings.repo)
    if survivors.repos:
        known = {r.name for r in repos}
        unknown = [name for name in survivors.repos if name not in known]
        if unknown:
            raise ConfigError(
                f"the scenario names repositories that are not configured: {', '.join(unknown)}",
                hint=f"configured repositories: {', '.join(sorted(known))}",
            )
        repos = [r for r in repos if r.name in survivors.repos]
    if survivors.offsite_only:
        repos = [r for r in repos if r.offsite]
    if survivors.object_lock_only:
        repos = [r for r in repos if isinstance(r, S3Repo) and r.object_lock is not None]
    if not repos:
        raise DrillRestoreFailed(
            "no configured repository survives the scenario (repos "
            f"{survivors.repos or 'all'}, offsite_only {survivors.offsite_only}, object_lock_only"
            f" {survivors.object_lock_only})",
            hint="configure an offsite (or Object Lock) copy: this disaster would lose every one",
        )
    keys = settings.keys
    if not survivors.vault:
        if survivors.recovery_key is None:
            raise ConfigError(
                "the scenario loses Vault (survivors.vault = false) but names no recovery key",
                hint="set survivors.recovery_key to the escrow private key file",
            )
        keys = keys.model_copy(update={"recovery_key": survivors.recovery_key.absolute()})
    return settings.model_copy(update={"repo": repos, "keys": keys})


def spec_from(
    *,
    backup: str | None,
    time: str | None,
    name: str | None,
    lsn: str | None,
    xid: str | None,
    random_point: bool,
) -> RestorePointSpec | None:
    """The restore point given on the command line, or None when none was given."""
    if not any((backup, time, name, lsn, xid, random_point)):
        return None
    return RestorePointSpec.model_validate(
        {
            "backup": backup,
            "time": time,
            "name": name,
            "lsn": lsn,
            "xid": xid,
            "random": random_point,
        }
    )


def choose_restore_point(repo: Repository, spec: RestorePointSpec, origin: str) -> RestorePlan:
    """The backup and target for ``spec``; ``origin`` says where the spec came from ("requested",
    "scenario 'site-loss'")."""
    if spec.random:
        return random_point(repo, origin)
    target = recovery_target(
        time=spec.time.isoformat() if spec.time else None,
        name=spec.name,
        lsn=spec.lsn,
        xid=spec.xid,
    )
    if target is not None:
        return RestorePlan(
            spec.backup, target, f"recovery target {target.kind} '{target.value}' ({origin})"
        )
    if spec.immediate or (spec.backup is not None and not spec.latest):
        backup = spec.backup or "latest"
        return RestorePlan(
            backup,
            RecoveryTarget(TargetKind.IMMEDIATE),
            f"backup '{backup}' restored to its end, no archived WAL ({origin})",
        )
    return RestorePlan(
        spec.backup,
        RecoveryTarget(TargetKind.LATEST),
        f"{'backup ' + repr(spec.backup) if spec.backup else 'the newest backup'} and every"
        f" archived WAL segment after it ({origin})",
    )


def random_point(repo: Repository, origin: str) -> RestorePlan:
    """A random backup and a random instant in the WAL archived after it.

    The instant is drawn uniformly between the backup's end and the time the last segment of
    the unbroken archive after it was pushed, on the backup's timeline. Recovery is then asked
    to stop at the start of the first segment pushed at or after that instant: every record
    before it was written before the instant, and a record starts at or after it in an archived
    segment, so recovery always reaches it. A time target gives no such promise: PostgreSQL
    stops only at a commit after the time and fails when the archive holds none (an idle
    stretch at its end). Without archived WAL after the backup, the backup's end is the point.
    """
    labels = repo.backups()
    if not labels:
        raise DrillRestoreFailed(f"repository '{repo.name}' holds no backups")
    label = random.choice(labels)  # noqa: S311 - picks a point to drill, not a secret
    picked = f"random backup ({origin}), one of {len(labels)}"
    manifest, _ = repo.load_manifest(label)
    archive = WalArchive(repo, segment_size=manifest.wal_segment_size)
    segments = _archived_after(archive, manifest)
    if not segments:
        return RestorePlan(
            str(label),
            RecoveryTarget(TargetKind.IMMEDIATE),
            f"{picked}, restored to its end (no WAL archived after it)",
        )
    start, end = manifest.stop_time, archive.pushed_at(segments[-1])
    instant = start + timedelta(seconds=random.uniform(0, max(0.0, (end - start).total_seconds())))  # noqa: S311
    segment = _first_pushed_at_or_after(archive, segments, instant)
    lsn = format_lsn(
        parse_segment_name(segment, manifest.wal_segment_size)[1] * manifest.wal_segment_size
    )
    return RestorePlan(
        str(label),
        RecoveryTarget(TargetKind.LSN, lsn, timeline="current"),
        f"{picked}, to a random instant {_iso(instant)} between its end {_iso(start)} and its"
        f" archive's end {_iso(end)}: recovery stops at {lsn}, where segment '{segment}'"
        " (the first one archived by then) begins",
        time=instant,
    )


def _archived_after(archive: WalArchive, manifest: Manifest) -> list[str]:
    """The segments archived after the backup's last one, on its timeline, up to the first gap."""
    size = manifest.wal_segment_size
    last = archive.last_segment(manifest.timeline)
    if last is None:
        return []
    first_segno = parse_segment_name(manifest.stop_wal, size)[1] + 1
    found = []
    for segno in range(first_segno, parse_segment_name(last, size)[1] + 1):
        name = segment_name(manifest.timeline, segno, size)
        if not archive.has(name):
            break
        found.append(name)
    return found


def _first_pushed_at_or_after(archive: WalArchive, segments: list[str], instant: datetime) -> str:
    """Segments are pushed in order: a binary search reads a few headers."""
    low, high = 0, len(segments) - 1
    while low < high:
        middle = (low + high) // 2
        if archive.pushed_at(segments[middle]) >= instant:
            high = middle
        else:
            low = middle + 1
    return segments[low]


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def planned_manifest(repo: Repository, plan: RestorePlan) -> Manifest:
    """The manifest of the backup the restore will start from (for its size and tablespaces)."""
    wanted = plan.backup
    label = choose_backup(repo, plan.target) if wanted is None else repo.resolve(wanted)
    manifest, _ = repo.load_manifest(label)
    return manifest


def source_places(settings: Settings) -> list[Path]:
    """The source's data directory and the directories its tablespace links point to."""
    pgdata = settings.postgres.pgdata
    if pgdata is None:
        return []  # remote mode: the source's files are on another host
    places = [pgdata]
    try:
        links = list((pgdata / "pg_tblspc").iterdir())
    except OSError:
        links = []  # not readable from here (another host): PGDATA itself is still refused
    for link in links:
        try:
            places.append(Path(link.readlink()) if link.is_symlink() else link)
        except OSError:
            continue
    return places
