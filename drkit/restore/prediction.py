"""How long a restore will take, predicted from the drills that restored before it.

A drill times the same restore a disaster would run (docs/drills.md), so its record says how fast
this installation restores: its ``restore`` phase wrote ``restored_bytes`` (fetch, decrypt,
decompress, write, check), and its ``wal-replay+start`` phase started the copy and replayed
``wal_segments`` archived segments until it was promoted. Two rates come from that history:

- bytes per second of the restore phase: the drills' bytes over their seconds, summed (so a large
  drill weighs more than a small one);
- the start and WAL replay: when the drills fetched different numbers of segments, a fixed start
  time plus seconds per segment, fitted by least squares (neither below zero); when they all
  fetched the same number, their seconds per segment (or, with none fetched, their mean start).

A drill that never got its copy started (``restore-failed``) tells nothing about a restore's
speed and is left out; so are records without the two phases. Only the newest ``MAX_DRILLS`` are
used, so that the prediction follows the installation as it grows, and drills that restored from
the repository the restore will use are preferred when there are any (S3 is slower than a disk).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from drkit.repo.drills import DrillRecord, FailureKind

MAX_DRILLS = 10
RESTORE_PHASE = "restore"
START_PHASE = "wal-replay+start"


@dataclass(frozen=True)
class Sample:
    """What one drill measured: its restore and its start with WAL replay."""

    drill: str
    repository: str | None
    restored_bytes: int
    restore_seconds: float
    wal_segments: int
    start_seconds: float


@dataclass(frozen=True)
class Rates:
    """This installation's restore speed, from ``drills`` drill records."""

    drills: int
    repository: str | None  # the drills all restored from this repository (None: from any)
    bytes_per_second: float
    start_seconds: float  # fixed cost of starting the copy
    seconds_per_segment: float  # WAL fetched and replayed, per archived segment

    def predict(self, restore_bytes: int, wal_segments: int) -> Prediction:
        restore = restore_bytes / self.bytes_per_second
        replay = self.start_seconds + self.seconds_per_segment * wal_segments
        return Prediction(
            seconds=restore + replay,
            restore_seconds=restore,
            replay_seconds=replay,
            rates=self,
        )


@dataclass(frozen=True)
class Prediction:
    """Expected seconds until the restored copy is promoted: the restore, then the start with
    WAL replay. A drill's checks come on top."""

    seconds: float
    restore_seconds: float
    replay_seconds: float
    rates: Rates

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 3),
            "restore_seconds": round(self.restore_seconds, 3),
            "replay_seconds": round(self.replay_seconds, 3),
            "based_on_drills": self.rates.drills,
            "rates": {k: v for k, v in asdict(self.rates).items() if k != "drills"},
        }


def sample(record: DrillRecord) -> Sample | None:
    """The drill's measurements, or None when it cannot say how fast a restore runs."""
    if record.failure is FailureKind.RESTORE_FAILED or record.restored_bytes <= 0:
        return None
    phases = {p.name: p.seconds for p in record.phases}
    restore, start = phases.get(RESTORE_PHASE), phases.get(START_PHASE)
    if restore is None or start is None or restore <= 0:
        return None
    return Sample(
        drill=record.id,
        repository=record.repository,
        restored_bytes=record.restored_bytes,
        restore_seconds=restore,
        wal_segments=record.wal_segments,
        start_seconds=start,
    )


def restore_rates(records: Iterable[DrillRecord], repository: str | None = None) -> Rates | None:
    """The rates of the newest usable drills (those from ``repository`` when there are any);
    None when no drill can tell."""
    samples = sorted(
        (s for s in map(sample, records) if s is not None), key=lambda s: s.drill, reverse=True
    )
    same_repo = [s for s in samples if repository is not None and s.repository == repository]
    chosen = (same_repo or samples)[:MAX_DRILLS]
    if not chosen:
        return None
    start, per_segment = _start_and_replay(chosen)
    return Rates(
        drills=len(chosen),
        repository=repository if same_repo else None,
        bytes_per_second=sum(s.restored_bytes for s in chosen)
        / sum(s.restore_seconds for s in chosen),
        start_seconds=start,
        seconds_per_segment=per_segment,
    )


def _start_and_replay(samples: list[Sample]) -> tuple[float, float]:
    """(fixed start seconds, seconds per segment) that explain the samples' start phases."""
    xs = [float(s.wal_segments) for s in samples]
    ys = [s.start_seconds for s in samples]
    n = len(samples)
    if len(set(xs)) < 2:
        if xs[0] > 0:
            return 0.0, sum(ys) / sum(xs)
        return sum(ys) / n, 0.0
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mean_x) ** 2 for x in xs
    )
    slope = max(slope, 0.0)
    intercept = mean_y - slope * mean_x
    if intercept < 0:  # through the origin instead: starting never takes negative time
        intercept = 0.0
        slope = sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)
    return intercept, slope
