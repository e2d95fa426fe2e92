"""Point-in-time recovery: pick the backup for a target and prove the archive can reach it.

Everything here runs before a single file is written: a target that no backup plus archived WAL
can reach is refused with the reason (before the oldest backup, past the end of the archive, a
missing segment on the way), instead of PostgreSQL discovering it after a long restore.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from drkit.errors import BackupSkipped, DrkitError, DrkitWarning, IntegrityError
from drkit.pg.recovery import RecoveryTarget, TargetKind
from drkit.pg.wal import parse_lsn, parse_segment_name, segment_name
from drkit.repo.chain import Chain
from drkit.repo.label import BackupLabel
from drkit.repo.manifest import Manifest
from drkit.repo.repository import Repository

if TYPE_CHECKING:
    from drkit.repo.wal_archive import WalArchive


class TargetUnreachable(DrkitError):
    """No backup plus archived WAL in the repository reaches the recovery target."""

    exit_code = 16


def choose_backup(repo: Repository, target: RecoveryTarget) -> BackupLabel:
    """The newest backup that ends before ``target`` (for time, LSN and XID targets)."""
    labels = repo.backups()
    if not labels:
        raise TargetUnreachable(f"repository '{repo.name}' holds no backups")
    if target.kind in (TargetKind.NAME, TargetKind.LATEST, TargetKind.IMMEDIATE):
        return labels[-1]
    for label in reversed(labels):
        try:
            manifest, _ = repo.load_manifest(label)
        except IntegrityError:
            continue  # damaged or unauthentic: an older backup reaches the target as well
        if _ends_before(manifest, target):
            return label
    oldest, _ = repo.load_manifest(labels[0])
    raise TargetUnreachable(
        f"recovery target {target.kind} '{target.value}' is before the end of the oldest backup"
        f" '{oldest.label}' (it ends at {oldest.stop_time.isoformat(timespec='seconds')},"
        f" LSN {oldest.stop_lsn})",
        hint="an older point needs an older backup, which this repository no longer has",
    )


def _ends_before(manifest: Manifest, target: RecoveryTarget) -> bool:
    if target.kind is TargetKind.TIME:
        return manifest.stop_time <= target.time
    if target.kind is TargetKind.LSN:
        return parse_lsn(manifest.stop_lsn) <= parse_lsn(target.value)
    if target.kind is TargetKind.XID:
        return manifest.stop_next_xid is not None and manifest.stop_next_xid <= int(target.value)
    return True


def _ends_after(manifest: Manifest, target: RecoveryTarget) -> bool:
    """Whether the backup ends after a time or LSN ``target``. Not for XIDs: a transaction that
    began before the backup ended may commit after it, so its target can still be reachable."""
    return target.kind in (TargetKind.TIME, TargetKind.LSN) and not _ends_before(manifest, target)


def check_reachable(repo: Repository, manifest: Manifest, target: RecoveryTarget) -> None:
    """Refuse a target before the end of the backup (recovery cannot stop before the backup is
    consistent: the copy would open later than asked), past the end of the archived WAL, or
    behind a gap in it."""
    if target.kind is TargetKind.IMMEDIATE:
        return  # the backup carries every segment it needs
    if _ends_after(manifest, target):
        raise TargetUnreachable(
            f"recovery target {target.kind} '{target.value}' is before the end of backup"
            f" '{manifest.label}' (it ends at {manifest.stop_time.isoformat(timespec='seconds')},"
            f" LSN {manifest.stop_lsn}): the restored copy cannot stop earlier",
            hint="choose an older backup ('drkit info' lists them), or leave --backup out and"
            " drkit picks the newest one that ends before the target",
        )
    if target.kind is TargetKind.TIME and target.time > datetime.now(UTC):
        raise TargetUnreachable(f"recovery target time '{target.value}' is in the future")
    from drkit.repo.wal_archive import WalArchive

    archive = WalArchive(repo)
    segment_size = manifest.wal_segment_size
    path = _timeline_path(archive, manifest, target)
    stop_segno = parse_segment_name(manifest.stop_wal, segment_size)[1]
    start = stop_segno
    last_name: str | None = None
    for index, (timeline, switch_lsn) in enumerate(path):
        final = index == len(path) - 1
        if final:
            last = archive.last_segment(timeline)
            end = parse_segment_name(last, segment_size)[1] if last else start - 1
            if target.kind is TargetKind.LSN:
                wanted = parse_lsn(target.value) // segment_size
                if wanted > end:
                    raise _past_archive(target, last, archive)
                end = wanted
        else:
            assert switch_lsn is not None
            end = switch_lsn // segment_size - 1  # the switch segment comes from the next one
        if end >= start:
            first = segment_name(timeline, start, segment_size)
            to = segment_name(timeline, end, segment_size)
            missing = archive.find_gaps(timeline, first, to)
            if missing:
                raise TargetUnreachable(
                    f"WAL segment '{missing[0]}' is missing from the archive of repository"
                    f" '{repo.name}': recovery from backup '{manifest.label}' cannot pass it"
                    f" ({len(missing)} segment(s) missing)",
                    hint="'drkit info' shows the archive's gaps; choose a target before the gap",
                )
            last_name = to
        if not final:
            assert switch_lsn is not None
            start = switch_lsn // segment_size
    if target.kind is TargetKind.TIME and (
        last_name is None or archive.pushed_at(last_name) < target.time
    ):
        raise _past_archive(target, last_name, archive)


def _timeline_path(
    archive: WalArchive, manifest: Manifest, target: RecoveryTarget
) -> list[tuple[int, int | None]]:
    """Timelines from the backup's to the target's: (timeline, LSN where it was left or None)."""
    if target.timeline == "current":
        wanted = manifest.timeline
    elif target.timeline == "latest":
        wanted = max([manifest.timeline, *archive.timelines()])
    else:
        wanted = int(target.timeline)
    if wanted == manifest.timeline:
        return [(manifest.timeline, None)]
    history = archive.history(wanted)  # [(ancestor timeline, LSN where it switched away), ...]
    ancestors = [tli for tli, _ in history]
    if manifest.timeline not in ancestors:
        raise TargetUnreachable(
            f"timeline {wanted} does not descend from timeline {manifest.timeline} of backup"
            f" '{manifest.label}'",
            hint="choose --target-timeline current or a backup taken on that timeline",
        )
    path: list[tuple[int, int | None]] = []
    for tli, switch in history[ancestors.index(manifest.timeline) :]:
        path.append((tli, switch))
    path.append((wanted, None))
    return path


def _past_archive(target: RecoveryTarget, last: str | None, archive: WalArchive) -> DrkitError:
    if last is None:
        where = "the archive holds no WAL after the backup"
    else:
        pushed = archive.pushed_at(last).isoformat(timespec="seconds")
        where = f"the archive ends with segment '{last}' (archived {pushed})"
    return TargetUnreachable(
        f"recovery target {target.kind} '{target.value}' is past the end of the archived WAL:"
        f" {where}",
        hint="check that archive_command works ('drkit info' shows the WAL ranges)",
    )


def newest_intact_chain(repo: Repository, events: list[DrkitWarning]) -> Chain:
    """The chain of the newest backup that restores: one whose manifest, or a manifest of a
    backup it depends on, is damaged or unauthentic is skipped (and said so in ``events``)."""
    first_error: IntegrityError | None = None
    for label in reversed(repo.backups()):
        try:
            return Chain.load(repo, label)
        except IntegrityError as exc:
            first_error = first_error or exc
            events.append(BackupSkipped(f"backup '{label}' skipped: {exc}"))
    if first_error is None:
        repo.resolve(None)  # raises: no backups at all
    raise IntegrityError(
        f"no backup in repository '{repo.name}' can be restored: {first_error}",
        hint="'drkit verify' reports what is damaged; restore from another repository's copy",
    )


def load_named_chain(repo: Repository, label: BackupLabel) -> Chain:
    """The chain of ``label``; when it is damaged, the error names the newest intact backup."""
    try:
        return Chain.load(repo, label)
    except IntegrityError as exc:
        intact = _newest_intact_label(repo, exclude=label)
        hint = (
            f"the newest intact backup is '{intact}': restore it with --backup {intact}"
            if intact
            else "no other backup in this repository can be restored"
        )
        raise IntegrityError(exc.message, hint=hint) from None


def _newest_intact_label(repo: Repository, exclude: BackupLabel) -> BackupLabel | None:
    for label in reversed(repo.backups()):
        if label == exclude:
            continue
        try:
            Chain.load(repo, label)
        except IntegrityError:
            continue
        return label
    return None
