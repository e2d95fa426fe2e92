"""Backup labels: sortable by time, encoding type and lineage (pgBackRest's scheme).

``20261126-010000F`` is a full backup; ``20261126-010000F_20261127-010000D`` a differential and
``20261126-010000F_20261127-020000I`` an incremental on top of that full backup.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

_STAMP = "%Y%m%d-%H%M%S"
_LABEL = re.compile(r"^(\d{8}-\d{6})F(?:_(\d{8}-\d{6})([DI]))?$")


class BackupType(StrEnum):
    FULL = "full"
    DIFF = "diff"
    INCR = "incr"


_SUFFIX = {BackupType.FULL: "F", BackupType.DIFF: "D", BackupType.INCR: "I"}


@dataclass(frozen=True, order=True)
class BackupLabel:
    text: str

    def __post_init__(self) -> None:
        if not _LABEL.match(self.text):
            raise ValueError(f"'{self.text}' is not a backup label")

    def __str__(self) -> str:
        return self.text

    @property
    def type(self) -> BackupType:
        match = _LABEL.match(self.text)
        assert match is not None
        suffix = match.group(3)
        return (
            BackupType.FULL
            if suffix is None
            else {"D": BackupType.DIFF, "I": BackupType.INCR}[suffix]
        )

    @property
    def full(self) -> str:
        """The label of the full backup this one belongs to (itself for a full)."""
        return self.text.split("_", 1)[0]

    @property
    def time(self) -> datetime:
        match = _LABEL.match(self.text)
        assert match is not None
        stamp = match.group(2) or match.group(1)
        return datetime.strptime(stamp, _STAMP).replace(tzinfo=UTC)

    @classmethod
    def new(cls, kind: BackupType, now: datetime, full: BackupLabel | None = None) -> BackupLabel:
        stamp = now.astimezone(UTC).strftime(_STAMP)
        if kind is BackupType.FULL:
            return cls(f"{stamp}F")
        if full is None:
            raise ValueError(f"a {kind} backup needs the label of its full backup")
        return cls(f"{full.full}_{stamp}{_SUFFIX[kind]}")

    @classmethod
    def is_label(cls, text: str) -> bool:
        return bool(_LABEL.match(text))


def label_after(
    kind: BackupType,
    now: datetime,
    full: BackupLabel | None,
    newest: BackupLabel | None,
    skew: timedelta = timedelta(seconds=2),
) -> BackupLabel | None:
    """The label of a backup of ``kind`` taken ``now`` (on ``full``), or None while it must wait
    for the next second: when it would not sort after ``newest``, the repository's last label,
    whose second has not passed yet (a diff taken in the same second as an incr on the same full
    sorts before it, ``D`` < ``I``). A ``newest`` of an earlier second, or more than
    ``skew`` ahead, is not waited for: waiting would not change the order (a label that sorts
    after the parent's lineage, or lies in the future: a forged object, which every reader
    skips, or another host's clock)."""
    label = BackupLabel.new(kind, now, full)
    if newest is None or label > newest:
        return label
    this_second = now.replace(microsecond=0)
    return None if this_second <= newest.time <= now + skew else label
