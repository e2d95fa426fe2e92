"""Names of the files PostgreSQL archives, and where each one lives in the repository.

A light module (no dataclasses, no crypto): the async archive_command imports it.
"""

from __future__ import annotations

import os
import re
from typing import Literal, NamedTuple

WAL_PREFIX = "wal/"

Kind = Literal["segment", "partial", "backup", "history"]
KeyPeriod = Literal["daily", "hourly"]

_PATTERNS: tuple[tuple[Kind, re.Pattern[str]], ...] = (
    ("segment", re.compile(r"[0-9A-F]{24}")),
    ("partial", re.compile(r"[0-9A-F]{24}\.partial")),
    ("backup", re.compile(r"[0-9A-F]{24}\.[0-9A-F]{8}\.backup")),
    ("history", re.compile(r"[0-9A-F]{8}\.history")),
)


class WalName(NamedTuple):
    """A file name PostgreSQL archives: a segment, a .partial, a .backup or a .history file."""

    name: str
    kind: Kind
    timeline: int

    @property
    def key(self) -> str:
        """The repository key of its archived object."""
        return f"{WAL_PREFIX}{self.name[:8]}/{self.name}"

    @property
    def segment(self) -> str:
        """The segment name a segment, .partial or .backup file belongs to ('' for .history)."""
        return "" if self.kind == "history" else self.name[:24]


def parse_wal_name(name: str) -> WalName:
    """Classify ``name``; raises ValueError for anything PostgreSQL does not archive."""
    for kind, pattern in _PATTERNS:
        if pattern.fullmatch(name):
            timeline = int(name[:8], 16)
            if timeline == 0:
                break
            return WalName(name, kind, timeline)
    raise ValueError(
        f"'{name}' is not a WAL file name (a segment such as 000000010000000000000003, or a"
        " .partial, .backup or .history file)"
    )


def is_wal_name(name: str) -> bool:
    try:
        parse_wal_name(name)
    except ValueError:
        return False
    return True


def history_name(timeline: int) -> str:
    return f"{timeline:08X}.history"


def file_identity(st: os.stat_result) -> str:
    """Which file (not only which name) was pushed: inode, size, mtime. The async spool's check
    that an answer is about the file PostgreSQL asks for, not an earlier one of that name."""
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
