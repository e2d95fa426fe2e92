"""One data key per WAL key period, obtained once and then kept in memory for the period.

WAL segments arrive every few seconds; asking Vault for a data key per segment would make Vault a
per-segment dependency and cost a round trip each time. Instead every segment archived within one
period (``keys.wal_key_period``, a day by default, aligned to the Unix epoch in UTC) is sealed with
the same DEK, whose wrapped record is stored once per period (write-once, like a backup's).

- A long-running archiver keeps one ``PeriodKeys`` and calls ``current()`` per segment: Vault is
  contacted once per period (to make the key), not per segment.
- A one-shot ``wal-push`` process calls ``current()`` once: exactly one Vault round trip, either
  unwrapping the period's stored record or making it.

Two writers racing to start a period both make a key; the write-once store lets one record win
(``store`` raises ObjectExists for the other), and the loser adopts the winner's key, so a period
never has two keys.

Note for wal-push (not written yet): ``load``/``store`` map a period to its key record in the
repository (e.g. ``wal/<timeline>/key/<period.name>/0001.json``); the segment's frame context
should name the period, so a segment cannot be moved to another period's key.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from drkit.crypto.base import KeyProvider
from drkit.errors import ObjectExists

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class KeyPeriod:
    """A half-open time range ``[start, end)`` that shares one data key."""

    start: datetime
    end: datetime

    @property
    def name(self) -> str:
        """Sortable and unique for a given period length, e.g. ``20261126T000000Z``."""
        return self.start.strftime("%Y%m%dT%H%M%SZ")


def period_of(when: datetime, length: timedelta) -> KeyPeriod:
    """The period of ``length`` containing ``when`` (periods are aligned to the Unix epoch)."""
    if length <= timedelta(0):
        raise ValueError("a key period must be longer than zero")
    if when.tzinfo is None:
        raise ValueError("key periods need an aware datetime")
    index = (when - _EPOCH) // length
    start = _EPOCH + index * length
    return KeyPeriod(start, start + length)


@dataclass(frozen=True)
class PeriodKey:
    period: KeyPeriod
    plaintext: bytes = field(repr=False)
    record: dict[str, Any]


class PeriodKeys:
    """The current period's data key, from memory, the stored record, or the provider.

    ``load(period)`` returns the period's stored key record or None; ``store(period, record)``
    stores it write-once (raising ObjectExists when another writer was first). ``clock`` returns
    the current time (aware); tests pass a fake one.
    """

    def __init__(
        self,
        provider: KeyProvider,
        length: timedelta,
        load: Callable[[KeyPeriod], dict[str, Any] | None],
        store: Callable[[KeyPeriod, dict[str, Any]], object],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        period_of(clock(), length)  # validates the length now rather than at the first segment
        self.provider = provider
        self.length = length
        self._load = load
        self._store = store
        self._clock = clock
        self._current: PeriodKey | None = None
        self._lock = threading.Lock()

    def current(self) -> PeriodKey:
        """The key of the period the clock is in now."""
        period = period_of(self._clock(), self.length)
        with self._lock:
            if self._current is None or self._current.period != period:
                self._current = self._obtain(period)
            return self._current

    def _obtain(self, period: KeyPeriod) -> PeriodKey:
        record = self._load(period)
        if record is not None:
            return PeriodKey(period, self.provider.unwrap(record), record)
        data_key = self.provider.new_data_key()
        try:
            self._store(period, data_key.record)
        except ObjectExists:  # another writer started this period first: use its key
            record = self._load(period)
            if record is None:
                raise
            return PeriodKey(period, self.provider.unwrap(record), record)
        return PeriodKey(period, data_key.plaintext, data_key.record)
