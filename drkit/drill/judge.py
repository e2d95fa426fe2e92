"""The verdict of a drill: a pure function of what it measured and the targets.

Order matters and is fixed: a copy that never came up is a failed restore, whatever else; a copy
that came up but failed a check is a failed check, even when it was fast; only a drill that
restored and passed every check can miss a target. A measurement that could not be made (no
target, nothing achieved) is neither met nor missed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from drkit.config.durations import format_duration
from drkit.repo.drills import CheckResult, FailureKind, Objective


@dataclass(frozen=True)
class Verdict:
    rto: Objective
    rpo: Objective
    failure: FailureKind | None
    reason: str  # empty on PASS


def objective(target: timedelta | None, achieved: float | None) -> Objective:
    """A target next to what was achieved (seconds); met when achieved <= target."""
    target_seconds = target.total_seconds() if target is not None else None
    met = None
    if target_seconds is not None and achieved is not None:
        met = achieved <= target_seconds
    return Objective(target_seconds=target_seconds, achieved_seconds=achieved, met=met)


def rpo_seconds(disaster: datetime, recovered: datetime | None) -> float | None:
    """Seconds between the recovered point and the disaster instant (never negative: a copy
    cannot hold commits from after the disaster it is measured against)."""
    if recovered is None:
        return None
    return max(0.0, (disaster - recovered).total_seconds())


def judge(
    *,
    restore_failure: tuple[FailureKind, str] | None,
    checks: list[CheckResult],
    rto: Objective,
    rpo: Objective,
) -> Verdict:
    """PASS (failure None) or the first failure in the order: restore, checks, targets."""
    if restore_failure is not None:
        kind, reason = restore_failure
        return Verdict(rto, rpo, kind, reason)
    failed = [c for c in checks if not c.ok]
    if failed:
        reason = "; ".join(f"check '{c.name}' failed: {c.detail}" for c in failed)
        return Verdict(rto, rpo, FailureKind.CHECK_FAILED, reason)
    missed = [
        f"{name} {_text(o.achieved_seconds)} > target {_text(o.target_seconds)}"
        for name, o in (("RTO", rto), ("RPO", rpo))
        if o.met is False
    ]
    if missed:
        return Verdict(rto, rpo, FailureKind.TARGET_MISSED, "; ".join(missed))
    return Verdict(rto, rpo, None, "")


def _text(value: float | None) -> str:
    return "-" if value is None else format_duration(value)
