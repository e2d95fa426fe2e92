"""Retention policy: from a repository's history, exactly which backups stay, which go, and which
archived WAL may go. Pure functions of their arguments (the time included): no I/O, except
where the facts come from (``backup_facts`` reads a manifest; ``policy_from`` takes the settings).

Rules (any combination; a backup is kept when *any* rule keeps it):

- ``full = N``: the N newest full backups, with every diff/incr that belongs to them.
- ``window = 30d``: every point in time of the last 30 days stays restorable. That needs the
  newest backup that was consistent (stopped) at or before the window's start, and every backup
  after it (Barman's recovery window).
- ``daily / weekly / monthly / yearly = N`` (GFS): for each of the N most recent days / ISO
  weeks / months / years that hold a full backup, the newest full backup of that period. Only
  full backups take these slots: a long-term copy should stand alone, not pin a chain of
  incrementals; a daily restore point to the minute is what ``window`` is for. Periods are
  counted among those that have a full backup (restic's rule), so backups that stopped running
  for a while never make the policy drop everything older; periods are UTC, from the backup's
  start time (its label).

Then, whatever the rules: the newest backup is always kept; so is the newest backup a passing
drill restored (the last one proven to restore stays until a newer one is proven too); and a
kept backup keeps every backup it needs (its chain: parent, the parent's parent, ... the full;
and any backup whose frames it references). A chain is never broken.

Drill records are kept at least 400 days (a year of quarterly reports and the audit after it),
and longer when the window is longer: they go when older than both.

WAL. A kept backup restores on its own (it stores the WAL from its start to its stop), and the
archive adds point-in-time recovery from it forward: from its ``start_wal`` on its timeline and
on every later timeline (a timeline that branched off after it). So, per archived timeline T,
WAL may go below the earliest ``start_wal`` of the kept backups on T or on an earlier timeline;
a timeline older than every kept backup's may go entirely. Segment names order like WAL
positions once the timeline is set aside (``TTTTTTTT`` + log + segment, fixed-width hex), so the
decision is "delete files of timeline T whose segment sorts below X", cheap to apply to a
listing. History files are never deleted: they are tiny and every later timeline needs them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from drkit.repo.drills import DrillOutcome, DrillRecord
from drkit.repo.label import BackupLabel, BackupType

DRILL_RECORDS_MIN_AGE = timedelta(days=400)

if TYPE_CHECKING:
    from drkit.config.settings import RetentionSettings
    from drkit.repo.repository import Repository


@dataclass(frozen=True)
class RetentionPolicy:
    """The rules of one repository; None switches a rule off."""

    full: int | None = None
    window: timedelta | None = None
    daily: int | None = None
    weekly: int | None = None
    monthly: int | None = None
    yearly: int | None = None

    def describe(self) -> str:
        """``full = 4, window = 30d`` (the configuration's own words)."""
        parts = []
        for name in ("full", "window", "daily", "weekly", "monthly", "yearly"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name} = {_duration(value) if name == 'window' else value}")
        return ", ".join(parts) or "none"


@dataclass(frozen=True)
class BackupFacts:
    """What the policy needs to know of one backup (from its manifest)."""

    label: BackupLabel
    start_time: datetime
    stop_time: datetime  # the backup restores to this point at the earliest
    timeline: int
    start_wal: str  # the first WAL segment it needs
    needs: frozenset[str] = frozenset()  # labels of the backups it cannot restore without

    @property
    def is_full(self) -> bool:
        return self.label.type is BackupType.FULL


@dataclass(frozen=True)
class WalCut:
    """Archived WAL of ``timeline`` that may go: files whose segment sorts below ``below``, or
    every file of the timeline when ``below`` is None. History files never go."""

    timeline: int
    below: str | None

    def covers(self, name: str) -> bool:
        """Whether the archived file ``name`` (segment, .partial, .backup) may go."""
        if name.endswith(".history") or int(name[:8], 16) != self.timeline:
            return False
        return self.below is None or name[8:24] < self.below[8:24]


@dataclass
class Decision:
    """The policy's verdict: every backup is in exactly one of ``keep`` and ``delete``."""

    keep: list[str] = field(default_factory=list)  # oldest first
    delete: list[str] = field(default_factory=list)  # oldest first
    reasons: dict[str, list[str]] = field(default_factory=dict)  # kept label -> why
    wal: list[WalCut] = field(default_factory=list)  # by timeline


def decide(
    backups: Sequence[BackupFacts],
    policy: RetentionPolicy,
    now: datetime,
    wal_timelines: Iterable[int] = (),
    proven: ProvenBackup | None = None,
) -> Decision:
    """Apply ``policy`` at time ``now`` to ``backups``; ``wal_timelines`` are the timelines the
    WAL archive holds (for the WAL cuts); ``proven`` the newest backup a passing drill restored
    (``newest_proven``)."""
    ordered = sorted(backups, key=lambda b: b.label)
    reasons: dict[str, list[str]] = {}

    def keep(label: BackupLabel | str, why: str) -> None:
        reasons.setdefault(str(label), []).append(why)

    if ordered:
        keep(ordered[-1].label, "newest")
    if proven is not None and any(str(b.label) == proven.label for b in ordered):
        keep(proven.label, f"newest backup a passing drill restored (drill {proven.drill})")
    for rule in (_keep_full, _keep_window, _keep_gfs):
        rule(ordered, policy, now, keep)
    _keep_chains(ordered, reasons)

    kept = [b for b in ordered if str(b.label) in reasons]
    return Decision(
        keep=[str(b.label) for b in kept],
        delete=[str(b.label) for b in ordered if str(b.label) not in reasons],
        reasons=reasons,
        wal=wal_cuts(kept, wal_timelines),
    )


@dataclass(frozen=True)
class ProvenBackup:
    label: str
    drill: str  # the id of the newest passing drill that restored it


def newest_proven(records: Iterable[DrillRecord]) -> ProvenBackup | None:
    """The newest backup a passing drill restored, with the newest such drill."""
    proven = [
        (r.restore_point.backup, r.id)
        for r in records
        if r.outcome is DrillOutcome.PASS and r.restore_point is not None
    ]
    return ProvenBackup(*max(proven)) if proven else None


def drill_records_kept_since(policy: RetentionPolicy, now: datetime) -> datetime:
    """Drill records of drills started before this may go: older than 400 days and than the
    window (the id's time counts: it is what the record is bound to)."""
    return now - max(DRILL_RECORDS_MIN_AGE, policy.window or timedelta(0))


def wal_cuts(kept: Iterable[BackupFacts], timelines: Iterable[int]) -> list[WalCut]:
    """Per archived timeline, the WAL no kept backup needs (see the module docstring). With no
    kept backup nothing is cut: WAL without a backup is all there is to recover from."""
    kept = list(kept)
    if not kept:
        return []
    cuts = []
    for timeline in sorted(set(timelines)):
        starts = [b.start_wal[8:24] for b in kept if b.timeline <= timeline]
        cuts.append(WalCut(timeline, f"{timeline:08X}{min(starts)}" if starts else None))
    return cuts


def stale_leftovers(incomplete: Iterable[BackupLabel], newest: BackupLabel | None) -> list[str]:
    """Leftovers of backups that never completed and are older than the newest complete backup
    (a newer one may still be running, or be a copy in progress)."""
    if newest is None:
        return []
    return [str(label) for label in sorted(incomplete) if label < newest]


# -- the rules ------------------------------------------------------------------------------------

_Keep = Callable[[BackupLabel | str, str], None]


def _keep_full(
    backups: Sequence[BackupFacts], policy: RetentionPolicy, now: datetime, keep: _Keep
) -> None:
    if policy.full is None:
        return
    fulls = [b for b in backups if b.is_full][-policy.full :]
    for rank, full in enumerate(reversed(fulls), 1):
        keep(full.label, f"full {rank} of {policy.full}")
    kept_fulls = {str(f.label) for f in fulls}
    for b in backups:
        if not b.is_full and b.label.full in kept_fulls:
            keep(b.label, f"belongs to full {b.label.full}")


def _keep_window(
    backups: Sequence[BackupFacts], policy: RetentionPolicy, now: datetime, keep: _Keep
) -> None:
    if policy.window is None:
        return
    start = now - policy.window
    window = _duration(policy.window)
    anchors = [b for b in backups if b.stop_time <= start]
    if anchors:
        anchor = max(anchors, key=lambda b: (b.stop_time, b.label))
        keep(anchor.label, f"window {window}: restores to the window's start")
    for b in backups:
        if b.stop_time > start:
            keep(b.label, f"window {window}")


def _keep_gfs(
    backups: Sequence[BackupFacts], policy: RetentionPolicy, now: datetime, keep: _Keep
) -> None:
    fulls = [b for b in reversed(backups) if b.is_full]  # newest first
    periods: list[tuple[str, int | None, Callable[[datetime], str]]] = [
        ("daily", policy.daily, lambda t: t.strftime("%Y-%m-%d")),
        ("weekly", policy.weekly, lambda t: "{}-W{:02d}".format(*t.isocalendar()[:2])),
        ("monthly", policy.monthly, lambda t: t.strftime("%Y-%m")),
        ("yearly", policy.yearly, lambda t: t.strftime("%Y")),
    ]
    for name, count, period_of in periods:
        if count is None:
            continue
        seen: set[str] = set()
        for b in fulls:
            period = period_of(b.label.time)
            if period in seen:
                continue
            if len(seen) == count:
                break
            seen.add(period)
            keep(b.label, f"{name} {period}")


def _keep_chains(backups: Sequence[BackupFacts], reasons: dict[str, list[str]]) -> None:
    """Every kept backup keeps what it needs; newest first, so a chain is followed to its end.
    A backup kept only for another's sake names the newest one that needs it."""
    for b in reversed(backups):
        if str(b.label) in reasons:
            for needed in sorted(b.needs - {str(b.label)}):
                reasons.setdefault(needed, [f"needed by {b.label}"])
    present = {str(b.label) for b in backups}
    for label in [label for label in reasons if label not in present]:
        del reasons[label]  # a needed backup the repository no longer has: nothing to keep


def _duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# -- the facts, from a repository and the configuration -------------------------------------


def policy_from(retention: RetentionSettings) -> RetentionPolicy:
    """The policy a ``[retention]`` table configures."""
    return RetentionPolicy(**retention.model_dump())


def backup_facts(repo: Repository, label: BackupLabel) -> BackupFacts:
    """The policy's view of one backup, from its manifest. Raises when the manifest cannot be
    read (IntegrityError when it fails authentication: prune leaves such a backup out)."""
    manifest, _ = repo.load_manifest(label)
    needs = set(manifest.chain)
    needs.update(f.backup for f in manifest.files if f.backup)
    needs.update(f.base for f in manifest.files if f.base)
    if manifest.parent:
        needs.add(manifest.parent)
    needs.discard(str(label))
    return BackupFacts(
        label=label,
        start_time=manifest.start_time,
        stop_time=manifest.stop_time,
        timeline=manifest.timeline,
        start_wal=manifest.start_wal,
        needs=frozenset(needs),
    )
