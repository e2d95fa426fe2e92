"""``drkit restore --plan``: what a restore would read, and how long it would take. No writes.

The plan makes the restore's own choices (``RestoreOperation.locate``: the repository, the backup,
its chain, every manifest checked, the target proven reachable), then adds up what the restore
would do: the frames it would fetch (stored bytes, each frame once), the bytes it would write, the
archived WAL segments the copy would fetch and replay. The expected duration comes from the drills
recorded in the repositories (restore/prediction.py), with the number of drills it rests on.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from drkit.config.settings import Settings
from drkit.errors import DrkitError, DrkitWarning, RepositoryUnreachable
from drkit.pg.recovery import RecoveryTarget, TargetKind
from drkit.pg.wal import parse_lsn, parse_segment_name, segment_name
from drkit.repo.chain import Chain
from drkit.repo.drills import DrillRecord
from drkit.repo.manifest import Manifest
from drkit.repo.repository import Repository
from drkit.restore.operation import RestoreOperation
from drkit.restore.prediction import MAX_DRILLS, Prediction, restore_rates
from drkit.restore.request import RestoreRequest, check_target
from drkit.restore.target import check_reachable
from drkit.result import OperationResult

if TYPE_CHECKING:
    from drkit.repo.wal_archive import WalArchive

# Records read per repository: enough for MAX_DRILLS usable ones among failed drills
READ_DRILLS = 3 * MAX_DRILLS


@dataclass(frozen=True)
class WalRange:
    """The WAL the restored copy replays: ``first``..``last``. Segments up to the backup's stop
    come with the backup; ``fetched`` counts those the copy fetches from the archive
    (restore_command fetches the backup's own range again, archive first)."""

    first: str
    last: str
    fetched: int
    upper_bound: bool = False  # a time, XID or name target may stop before ``last``

    def as_dict(self) -> dict[str, Any]:
        return {
            "first": self.first,
            "last": self.last,
            "fetched_segments": self.fetched,
            "upper_bound": self.upper_bound,
        }


@dataclass
class RestorePlanResult(OperationResult):
    """A restore planned, nothing written. Warnings: RepositoryUnreachable (a repository that
    could not be used, or whose drill records could not be read), BackupSkipped."""

    label: str
    repo: str
    chain: list[str]  # full first
    target: RecoveryTarget | None
    wal: WalRange
    fetch_bytes: int  # stored (compressed, encrypted) bytes of the frames read
    restore_bytes: int  # bytes written into the data directory
    files: int
    prediction: Prediction | None
    unreadable_drills: int = 0  # drill records that failed authentication, not used

    def _data(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "repo": self.repo,
            "chain": self.chain,
            "target": None
            if self.target is None
            else {"kind": self.target.kind.value, "value": self.target.value},
            "wal": self.wal.as_dict(),
            "fetch_bytes": self.fetch_bytes,
            "restore_bytes": self.restore_bytes,
            "files": self.files,
            "prediction": None if self.prediction is None else self.prediction.as_dict(),
            "unreadable_drills": self.unreadable_drills,
        }


def plan_restore(settings: Settings, request: RestoreRequest) -> RestorePlanResult:
    """What restoring ``request`` would read and write, and how long it would take."""
    warnings: list[DrkitWarning] = []
    timing = OperationResult()
    with timing.phase("plan"):
        # The restore's own choices: repository, backup, chain, target
        target = request.target
        if target is not None:
            check_target(target)
        repo, chain, repos = RestoreOperation(settings, request).locate(warnings)
        manifest = chain.target
        if target is not None:
            check_reachable(repo, manifest, target)

        # What it would read, write and replay
        fetch_bytes = _fetch_bytes(chain)
        wal = wal_range(repo, manifest, target)

    with timing.phase("predict"):
        # The drills recorded in the repositories say how fast this installation restores
        prediction, unreadable = predict_restore(repos, repo.name, manifest, wal, warnings)

    return RestorePlanResult(
        label=manifest.label,
        repo=repo.name,
        chain=manifest.chain or [manifest.label],
        target=target,
        wal=wal,
        fetch_bytes=fetch_bytes,
        restore_bytes=manifest.stats.size,
        files=len(manifest.files),
        prediction=prediction,
        unreadable_drills=unreadable,
        warnings=warnings,
        phases=timing.phases,
    )


def predict_restore(
    repos: list[Repository],
    restore_from: str,
    manifest: Manifest,
    wal: WalRange,
    warnings: list[DrkitWarning],
) -> tuple[Prediction | None, int]:
    """The expected duration of restoring ``manifest`` from repository ``restore_from`` and
    replaying ``wal``, from the newest drill records in ``repos`` (None: no drill can tell);
    and how many of those records failed authentication. A drill calls this in its plan step
    and records the prediction next to what it then achieves."""
    records, unreadable = _drill_records(repos, warnings)
    rates = restore_rates(records, restore_from)
    return (rates.predict(manifest.stats.size, wal.fetched) if rates else None), unreadable


def _fetch_bytes(chain: Chain) -> int:
    """Stored bytes of every frame the restore reads, each frame counted once."""
    frames = {
        (layer.owner, layer.entry.object, layer.entry.offset): layer.entry.length
        for plan in chain.plan()
        for layer in plan.layers
    }
    return sum(frames.values())


def wal_range(repo: Repository, manifest: Manifest, target: RecoveryTarget | None) -> WalRange:
    """The WAL a copy of ``manifest`` replays to reach ``target`` with the archive of ``repo``."""
    own = WalRange(manifest.start_wal, manifest.stop_wal, fetched=0)
    if target is None or target.kind is TargetKind.IMMEDIATE:
        return own  # the backup carries its WAL: nothing comes from the archive
    from drkit.repo.wal_archive import WalArchive

    archive = WalArchive(repo)
    size = manifest.wal_segment_size
    if target.timeline == "current":
        timeline = manifest.timeline
    elif target.timeline == "latest":
        timeline = max([manifest.timeline, *archive.timelines()])
    else:
        timeline = int(target.timeline)
    first = parse_segment_name(manifest.start_wal, size)[1]
    last_name = archive.last_segment(timeline)
    last = parse_segment_name(last_name, size)[1] if last_name else first
    if target.kind is TargetKind.LSN:
        last = min(last, parse_lsn(target.value) // size)
    elif target.kind is TargetKind.TIME:
        last = _first_pushed_after(archive, timeline, first, last, target, size)
    last = max(last, parse_segment_name(manifest.stop_wal, size)[1])
    return WalRange(
        manifest.start_wal,
        segment_name(timeline, last, size),
        fetched=last - first + 1,
        upper_bound=target.kind in (TargetKind.XID, TargetKind.NAME),
    )


def _first_pushed_after(
    archive: WalArchive, timeline: int, first: int, last: int, target: RecoveryTarget, size: int
) -> int:
    """The first segment archived at or after the target time: recovery reaches the target in
    it at the latest. Segments are archived in order, so a binary search reads a few headers."""
    names = [segment_name(timeline, n, size) for n in range(first, last + 1)]
    present = [name for name in names if archive.has(name)]
    if not present:
        return last
    keys = _LazyPushed(archive, present)
    index = bisect_left(keys, target.time)
    chosen = present[min(index, len(present) - 1)]
    return parse_segment_name(chosen, size)[1]


class _LazyPushed:
    """``pushed_at`` of a list of segments, read only where the binary search looks."""

    def __init__(self, archive: WalArchive, names: list[str]) -> None:
        self.archive, self.names = archive, names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> datetime:
        return self.archive.pushed_at(self.names[index])


def _drill_records(
    repos: list[Repository], warnings: list[DrkitWarning]
) -> tuple[list[DrillRecord], int]:
    """The newest authentic drill records in ``repos``, once per drill (each record costs a key
    unwrap, a Vault request with Vault, so only the newest few are read); and how many of those
    read had no authentic copy."""
    found: dict[str, DrillRecord] = {}
    unreadable: set[str] = set()
    for repo in repos:
        try:
            ids = [i for i in reversed(repo.drill_ids()) if i not in found][:READ_DRILLS]
            entries = [repo.drill_record(drill_id) for drill_id in ids]
        except DrkitError as exc:
            warnings.append(
                RepositoryUnreachable(
                    f"drill records of repository '{repo.name}' could not be read: {exc.message}"
                )
            )
            continue
        for entry in entries:
            if entry.record is not None:
                found[entry.id] = entry.record
            else:
                unreadable.add(entry.id)
    return list(found.values()), len(unreadable - found.keys())
