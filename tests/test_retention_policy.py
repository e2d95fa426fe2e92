"""The retention policy on synthetic histories: exact keep/delete sets, chains, WAL cut points."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from drkit.config.settings import PosixRepo, RetentionSettings
from drkit.repo.label import BackupLabel
from drkit.repo.retention import (
    BackupFacts,
    Decision,
    RetentionPolicy,
    WalCut,
    decide,
    policy_from,
    stale_leftovers,
    wal_cuts,
)

T0 = datetime(2026, 1, 1, 1, 0, tzinfo=UTC)  # a Thursday


def stamp(when: datetime) -> str:
    return when.strftime("%Y%m%d-%H%M%S")


def wal(timeline: int, segno: int) -> str:
    return f"{timeline:08X}{segno >> 8:08X}{segno & 0xFF:08X}"


class History:
    """Backups taken in order; each diff/incr gets its real chain (parent's chain + parent)."""

    def __init__(self) -> None:
        self.backups: list[BackupFacts] = []
        self._chain: dict[str, list[str]] = {}
        self._segno = 0

    def take(
        self,
        kind: str,
        when: datetime,
        *,
        timeline: int = 1,
        duration: timedelta = timedelta(minutes=10),
        segno: int | None = None,
    ) -> str:
        if kind == "F":
            label, chain = f"{stamp(when)}F", []
        else:
            fulls = [b for b in self.backups if b.is_full]
            full = str(fulls[-1].label)
            parent = full if kind == "D" else str(self.backups[-1].label)
            label = f"{full}_{stamp(when)}{kind}"
            chain = [*self._chain[parent], parent]
        self._chain[label] = chain
        self._segno = segno if segno is not None else self._segno + 0x10
        self.backups.append(
            BackupFacts(
                label=BackupLabel(label),
                start_time=when,
                stop_time=when + duration,
                timeline=timeline,
                start_wal=wal(timeline, self._segno),
                needs=frozenset(chain),
            )
        )
        return label

    @property
    def labels(self) -> list[str]:
        return [str(b.label) for b in self.backups]

    def decide(
        self, policy: RetentionPolicy, now: datetime, timelines: Iterable[int] = ()
    ) -> Decision:
        decision = decide(self.backups, policy, now, timelines)
        assert sorted(decision.keep + decision.delete) == sorted(self.labels)
        assert not set(decision.keep) & set(decision.delete)
        assert decision.keep == sorted(decision.keep) and decision.delete == sorted(decision.delete)
        assert set(decision.reasons) == set(decision.keep)
        return decision


def weekly_fulls_daily_incrs(weeks: int) -> tuple[History, list[list[str]]]:
    """A full every Thursday, an incr every other day: ``weeks`` weeks of it."""
    history = History()
    families = []
    for week in range(weeks):
        day0 = T0 + timedelta(weeks=week)
        family = [history.take("F", day0)]
        family += [history.take("I", day0 + timedelta(days=d)) for d in range(1, 7)]
        families.append(family)
    return history, families


# -- keep-N-full -------------------------------------------------------------------------------


def test_full_count_keeps_the_newest_fulls_with_their_chains() -> None:
    history, families = weekly_fulls_daily_incrs(4)
    decision = history.decide(RetentionPolicy(full=2), T0 + timedelta(weeks=5))
    assert decision.keep == families[2] + families[3]
    assert decision.delete == families[0] + families[1]
    assert decision.reasons[families[3][0]] == ["full 1 of 2"]
    assert decision.reasons[families[2][0]] == ["full 2 of 2"]
    assert decision.reasons[families[2][3]] == [f"belongs to full {families[2][0]}"]
    assert decision.reasons[families[3][-1]][0] == "newest"


def test_full_count_with_diffs_and_incrs_mixed() -> None:
    h = History()
    f1 = h.take("F", T0)
    f1_i1 = h.take("I", T0 + timedelta(hours=1))
    f1_d1 = h.take("D", T0 + timedelta(hours=2))
    f1_i2 = h.take("I", T0 + timedelta(hours=3))  # parent: the diff
    f2 = h.take("F", T0 + timedelta(hours=4))
    f2_d1 = h.take("D", T0 + timedelta(hours=5))
    assert h.backups[3].needs == {f1, f1_d1}  # the incr's chain skips the older incr
    decision = h.decide(RetentionPolicy(full=1), T0 + timedelta(days=1))
    assert decision.keep == [f2, f2_d1]
    assert decision.delete == [f1, f1_i1, f1_d1, f1_i2]
    # more fulls asked for than exist: everything stays
    assert h.decide(RetentionPolicy(full=5), T0 + timedelta(days=1)).delete == []


def test_newest_backup_is_always_kept_with_its_whole_chain() -> None:
    h = History()
    f1 = h.take("F", T0)
    i1 = h.take("I", T0 + timedelta(days=1))
    h.take("I", T0 + timedelta(days=2))
    f2 = h.take("F", T0 + timedelta(days=3))
    # a diff of the *old* full after the new full is impossible; an incr chain on f2 then
    # a new incr: the newest is an incr three deep
    i21 = h.take("I", T0 + timedelta(days=4))
    i22 = h.take("I", T0 + timedelta(days=5))
    decision = h.decide(RetentionPolicy(yearly=1), T0 + timedelta(days=6))
    assert decision.keep == [f2, i21, i22]
    assert decision.reasons[i22] == ["newest"]
    assert decision.reasons[i21] == [f"needed by {i22}"]
    assert decision.reasons[f2] == ["yearly 2026"]
    assert f1 in decision.delete and i1 in decision.delete


def test_a_needed_backup_missing_from_the_repository_is_not_invented() -> None:
    h = History()
    h.take("F", T0)
    incr = h.take("I", T0 + timedelta(days=1))
    h.backups.pop(0)  # the full is gone already (damaged repository)
    decision = h.decide(RetentionPolicy(full=1), T0 + timedelta(days=2))
    assert decision.keep == [incr] and decision.delete == []


def test_empty_history() -> None:
    assert decide([], RetentionPolicy(full=1), T0, [1, 2]) == Decision()


# -- recovery window -----------------------------------------------------------------------------


def test_window_keeps_the_backup_before_its_start_and_everything_after() -> None:
    history, families = weekly_fulls_daily_incrs(3)
    labels = history.labels
    now = T0 + timedelta(days=20, hours=12)  # week 2, day 6 (an incr at 01:00 that day)
    decision = history.decide(RetentionPolicy(window=timedelta(days=3)), now)
    # window start: day 17 12:00 -> the newest backup stopped by then is day 17's incr
    # (week 2, day 3), which needs the week-2 full and incrs 1-2
    anchor = families[2][3]
    assert anchor == next(x for x in labels if x.split("_")[-1].startswith("20260118"))
    assert decision.keep == families[2]
    assert decision.delete == families[0] + families[1]
    assert decision.reasons[anchor] == ["window 3d: restores to the window's start"]
    assert decision.reasons[families[2][4]] == ["window 3d"]
    assert decision.reasons[families[2][1]] == [f"needed by {families[2][6]}"]


def test_window_anchor_must_have_stopped_before_the_window_starts() -> None:
    h = History()
    a = h.take("F", T0)
    b = h.take("F", T0 + timedelta(days=1), duration=timedelta(hours=2))  # stops 03:00
    c = h.take("F", T0 + timedelta(days=2))
    now = T0 + timedelta(days=2, hours=1)  # window start: day 1, 02:00 (b still running)
    decision = h.decide(RetentionPolicy(window=timedelta(days=1)), now)
    assert decision.keep == [a, b, c]
    assert decision.reasons[a] == ["window 1d: restores to the window's start"]
    assert decision.reasons[b] == ["window 1d"]
    # an hour later b had stopped before the window's start: a goes
    later = h.decide(RetentionPolicy(window=timedelta(days=1)), now + timedelta(hours=1))
    assert later.keep == [b, c] and later.delete == [a]


def test_window_with_every_backup_inside_keeps_all() -> None:
    history, _ = weekly_fulls_daily_incrs(2)
    decision = history.decide(RetentionPolicy(window=timedelta(days=30)), T0 + timedelta(days=15))
    assert decision.delete == []


def test_window_long_past_keeps_only_the_newest() -> None:
    history, families = weekly_fulls_daily_incrs(2)
    decision = history.decide(RetentionPolicy(window=timedelta(hours=12)), T0 + timedelta(days=60))
    # the anchor is the newest backup: it and its chain (the week-1 family)
    assert decision.keep == families[1]
    assert decision.reasons[families[1][-1]] == [
        "newest",
        "window 12h: restores to the window's start",
    ]


# -- GFS ----------------------------------------------------------------------------------------


def fulls_at(*whens: datetime) -> tuple[History, list[str]]:
    h = History()
    return h, [h.take("F", when) for when in whens]


def test_daily_keeps_the_newest_full_of_each_of_the_last_days_with_one() -> None:
    day = timedelta(days=1)
    h, f = fulls_at(
        T0,  # day 0
        T0 + 1 * day,
        T0 + 1 * day + timedelta(hours=12),  # day 1's newest
        T0 + 2 * day,
        T0 + 5 * day,  # days 3 and 4 have none: they do not count
        T0 + 5 * day + timedelta(hours=6),
    )
    decision = h.decide(RetentionPolicy(daily=3), T0 + 30 * day)
    assert decision.keep == [f[2], f[3], f[5]]
    assert decision.reasons[f[5]] == ["newest", "daily 2026-01-06"]
    assert decision.reasons[f[3]] == ["daily 2026-01-03"]
    assert decision.reasons[f[2]] == ["daily 2026-01-02"]


def test_gfs_slots_take_full_backups_only() -> None:
    history, families = weekly_fulls_daily_incrs(3)
    decision = history.decide(RetentionPolicy(daily=2), T0 + timedelta(weeks=4))
    # the last two days with a full are the last two Thursdays; the incrs of those weeks go,
    # except the newest backup and its chain (the whole last week)
    assert decision.keep == [families[1][0], *families[2]]
    assert decision.delete == families[0] + families[1][1:]


def test_weekly_monthly_yearly() -> None:
    h, f = fulls_at(
        datetime(2023, 6, 1, tzinfo=UTC),  # 0
        datetime(2024, 3, 1, tzinfo=UTC),  # 1
        datetime(2024, 12, 30, tzinfo=UTC),  # 2: Monday of ISO week 2025-W01
        datetime(2025, 1, 5, tzinfo=UTC),  # 3: Sunday, still 2025-W01; year 2025
        datetime(2025, 11, 3, tzinfo=UTC),  # 4: 2025-W45
        datetime(2025, 11, 9, tzinfo=UTC),  # 5: 2025-W45 (Sunday)
        datetime(2025, 11, 10, tzinfo=UTC),  # 6: 2025-W46
        datetime(2025, 12, 1, tzinfo=UTC),  # 7: 2025-W49
        datetime(2025, 12, 31, tzinfo=UTC),  # 8: 2026-W01, month 2025-12, year 2025
    )
    now = datetime(2026, 1, 10, tzinfo=UTC)
    weekly = h.decide(RetentionPolicy(weekly=3), now)
    assert weekly.keep == [f[6], f[7], f[8]]
    assert weekly.reasons[f[8]] == ["newest", "weekly 2026-W01"]
    monthly = h.decide(RetentionPolicy(monthly=3), now)
    assert monthly.keep == [f[3], f[6], f[8]]  # 2025-12, 2025-11 (its newest), 2025-01
    assert monthly.reasons[f[6]] == ["monthly 2025-11"]
    yearly = h.decide(RetentionPolicy(yearly=3), now)
    # 2024-12-30 is in ISO week 2025-W01 but in the calendar year 2024, whose newest full it is
    assert yearly.keep == [f[0], f[2], f[8]]
    assert yearly.reasons[f[2]] == ["yearly 2024"] and yearly.reasons[f[0]] == ["yearly 2023"]
    gfs = h.decide(RetentionPolicy(weekly=5, monthly=1, yearly=2), now)
    assert gfs.keep == [f[2], f[3], f[5], f[6], f[7], f[8]]
    assert gfs.delete == [f[0], f[1], f[4]]
    assert gfs.reasons[f[3]] == ["weekly 2025-W01"]  # the newest of its week, not f[2]
    assert gfs.reasons[f[5]] == ["weekly 2025-W45"]  # the newest of its week, not f[4]
    assert gfs.reasons[f[2]] == ["yearly 2024"]
    assert gfs.reasons[f[8]] == ["newest", "weekly 2026-W01", "monthly 2025-12", "yearly 2025"]


# -- combinations ---------------------------------------------------------------------------------


def test_rules_combine_as_a_union() -> None:
    history, families = weekly_fulls_daily_incrs(6)
    now = T0 + timedelta(weeks=5, days=6, hours=12)
    full = history.decide(RetentionPolicy(full=1), now)
    window = history.decide(RetentionPolicy(window=timedelta(days=8)), now)
    weekly = history.decide(RetentionPolicy(weekly=4), now)
    both = history.decide(RetentionPolicy(full=1, window=timedelta(days=8), weekly=4), now)
    assert set(both.keep) == set(full.keep) | set(window.keep) | set(weekly.keep)
    assert full.keep == families[5]
    # window start: week 4, day 5 11:... -> anchor = week 4 day 5's incr, chain = week 4 family
    assert window.keep == families[4] + families[5]
    assert weekly.keep == [families[2][0], families[3][0], *families[4][:1], *families[5]]
    assert both.keep == [families[2][0], families[3][0], *families[4], *families[5]]
    assert both.delete == families[0] + families[1] + families[2][1:] + families[3][1:]


# -- WAL -----------------------------------------------------------------------------------------


def test_wal_is_cut_below_the_oldest_kept_backup() -> None:
    history, families = weekly_fulls_daily_incrs(3)
    decision = history.decide(RetentionPolicy(full=2), T0 + timedelta(weeks=4), [1])
    oldest_kept = next(b for b in history.backups if str(b.label) == families[1][0])
    assert decision.wal == [WalCut(1, oldest_kept.start_wal)]
    cut = decision.wal[0]
    below = wal(1, 0x10 * 8 - 1)
    assert oldest_kept.start_wal == wal(1, 0x10 * 8)
    assert cut.covers(below)
    assert cut.covers(below + ".partial")
    assert cut.covers(below + ".00000028.backup")
    assert not cut.covers(oldest_kept.start_wal)
    assert not cut.covers(wal(1, 0x10 * 8 + 1))
    assert not cut.covers("00000001.history")
    assert not cut.covers(wal(2, 1))  # another timeline's files are another cut's business


def test_wal_cut_compares_across_log_boundaries() -> None:
    # segment 0x1FF of log 0 sorts before segment 0 of log 1, whatever the segment size
    cut = WalCut(1, "000000010000000100000000")
    assert cut.covers("0000000100000000000000FF")
    assert not cut.covers("000000010000000100000000")
    assert not cut.covers("000000010000000100000001")


def test_wal_of_timelines_before_every_kept_backup_goes_entirely() -> None:
    h = History()
    h.take("F", T0, timeline=1, segno=0x10)
    h.take("F", T0 + timedelta(days=1), timeline=1, segno=0x20)
    kept = h.take("F", T0 + timedelta(days=2), timeline=2, segno=0x30)
    decision = h.decide(RetentionPolicy(full=1), T0 + timedelta(days=3), [1, 2, 3])
    assert decision.keep == [kept]
    assert decision.wal == [WalCut(1, None), WalCut(2, wal(2, 0x30)), WalCut(3, wal(3, 0x30))]
    assert decision.wal[0].covers(wal(1, 0x999))
    assert not decision.wal[0].covers("00000001.history")
    assert not decision.wal[1].covers("00000002.history")


def test_wal_cut_on_a_branch_that_forked_before_a_newer_backup() -> None:
    """Timeline 2 forked from timeline 1 at segment 0x20 (a PITR to before backup B); backup C
    on timeline 2 starts at 0x25, older in WAL position than B (0x50) though newer in time."""
    h = History()
    h.take("F", T0, timeline=1, segno=0x10)
    b = h.take("F", T0 + timedelta(days=1), timeline=1, segno=0x50)
    c = h.take("F", T0 + timedelta(days=2), timeline=2, segno=0x25)
    decision = h.decide(RetentionPolicy(full=2), T0 + timedelta(days=3), [1, 2])
    assert decision.keep == [b, c]
    # timeline 1: below B; timeline 2: below C (not below B, which would cut C's WAL)
    assert decision.wal == [WalCut(1, wal(1, 0x50)), WalCut(2, wal(2, 0x25))]


def test_wal_kept_for_the_recovery_window_from_its_anchor() -> None:
    history, families = weekly_fulls_daily_incrs(3)
    now = T0 + timedelta(days=20, hours=12)
    decision = history.decide(RetentionPolicy(window=timedelta(days=3)), now, [1])
    week2_full = next(b for b in history.backups if str(b.label) == families[2][0])
    assert decision.wal == [WalCut(1, week2_full.start_wal)]


def test_no_backups_means_no_wal_cut() -> None:
    assert wal_cuts([], [1, 2]) == []


# -- leftovers, description, settings -----------------------------------------------------------


def test_stale_leftovers_are_those_older_than_the_newest_complete_backup() -> None:
    labels = [BackupLabel("20260101-010000F"), BackupLabel("20260103-010000F_20260103-020000I")]
    newest = BackupLabel("20260102-010000F")
    assert stale_leftovers(labels, newest) == ["20260101-010000F"]
    assert stale_leftovers(labels, None) == []


def test_policy_from_settings_and_its_description() -> None:
    settings = RetentionSettings.model_validate({"full": 4, "window": "30d", "monthly": 12})
    policy = policy_from(settings)
    assert policy == RetentionPolicy(full=4, window=timedelta(days=30), monthly=12)
    assert policy.describe() == "full = 4, window = 30d, monthly = 12"
    assert policy_from(RetentionSettings.model_validate({"window": "12h"})).window == timedelta(
        hours=12
    )
    assert RetentionSettings.model_validate({"window": "2w"}).window == timedelta(weeks=2)
    assert RetentionPolicy(window=timedelta(minutes=90)).describe() == "window = 5400s"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "at least one rule"),
        ({"window": "30x"}, "'30x' is not a duration such as '90s'"),
        ({"window": "0d"}, "longer than zero"),
        ({"full": 0}, "greater than or equal to 1"),
        ({"daily": 7, "hourly": 24}, "Extra inputs are not permitted"),
    ],
)
def test_retention_settings_are_validated(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RetentionSettings.model_validate(values)


def test_a_repository_carries_its_own_retention() -> None:
    repo = PosixRepo.model_validate({"name": "r", "path": "/x", "retention": {"full": 2}})
    assert repo.retention is not None and repo.retention.full == 2
    assert PosixRepo.model_validate({"name": "r", "path": "/x"}).retention is None
