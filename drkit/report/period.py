"""Report periods and cadence periods: calendar quarters, months, half years, years (UTC).

A period is half-open, ``[start, end)``: a drill at midnight on the first of a month belongs to
that month only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

_QUARTER = re.compile(r"^(\d{4})-?Q([1-4])$", re.IGNORECASE)


@dataclass(frozen=True)
class Period:
    start: datetime
    end: datetime  # exclusive
    label: str

    def __contains__(self, moment: datetime) -> bool:
        return self.start <= moment < self.end

    @property
    def last_day(self) -> date:
        return (self.end - timedelta(days=1)).date()


def _month_start(year: int, month: int) -> datetime:
    year, month = year + (month - 1) // 12, (month - 1) % 12 + 1
    return datetime(year, month, 1, tzinfo=UTC)


def quarter(text: str) -> Period:
    """'2026Q4' (or '2026-Q4') -> October 1st to January 1st; ValueError naming the form."""
    match = _QUARTER.match(text.strip())
    if not match:
        raise ValueError(f"'{text}' is not a quarter such as '2026Q4'")
    year, q = int(match.group(1)), int(match.group(2))
    return Period(_month_start(year, 3 * q - 2), _month_start(year, 3 * q + 1), f"{year}Q{q}")


def days(first: date, last: date) -> Period:
    """From the start of ``first`` to the end of ``last`` (both included)."""
    if last < first:
        raise ValueError(f"the period ends ({last}) before it starts ({first})")
    start = datetime(first.year, first.month, first.day, tzinfo=UTC)
    end = datetime(last.year, last.month, last.day, tzinfo=UTC) + timedelta(days=1)
    return Period(start, end, f"{first.isoformat()}..{last.isoformat()}")


def quarter_of(moment: datetime) -> Period:
    return quarter(f"{moment.year}Q{(moment.month - 1) // 3 + 1}")


_MONTHS = {"monthly": 1, "quarterly": 3, "half-yearly": 6, "yearly": 12}


def cadence_periods(cadence: str, span: Period) -> list[Period]:
    """The periods of ``cadence`` ('monthly', 'quarterly', 'half-yearly', 'yearly') that overlap
    ``span``, whole (a half year is due whole even when the report covers one quarter of it)."""
    months = _MONTHS[cadence]
    first = span.start
    index = (first.year * 12 + first.month - 1) // months * months  # months since year 0
    found: list[Period] = []
    while True:
        start = _month_start(index // 12, index % 12 + 1)
        if start >= span.end:
            return found
        end = _month_start(index // 12, index % 12 + 1 + months)
        found.append(Period(start, end, _label(cadence, start)))
        index += months


def _label(cadence: str, start: datetime) -> str:
    if cadence == "monthly":
        return start.strftime("%Y-%m")
    if cadence == "quarterly":
        return f"{start.year}Q{(start.month - 1) // 3 + 1}"
    if cadence == "half-yearly":
        return f"{start.year}H{1 if start.month <= 6 else 2}"
    return str(start.year)
