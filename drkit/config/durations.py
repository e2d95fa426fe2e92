"""Durations as operators write them in drkit.toml and on the command line: '90s', '15m', '4h',
'30d', '2w' (one number, one unit). Parsed to ``timedelta``; plain numbers are seconds."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(value: str) -> timedelta:
    """'4h' -> 4 hours; raises ValueError naming the accepted forms."""
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"'{value}' is not a duration such as '90s', '15m', '4h', '30d' or '2w'")
    return timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})


def format_duration(value: timedelta | float) -> str:
    """A short human form: '4h', '1h30m', '12.3s'."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    return "".join(f"{n}{u}" for n, u in parts if n) or "0s"


def _before(value: Any) -> Any:
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{value} is negative: a duration is a number of seconds >= 0")
        return timedelta(seconds=value)
    return value


Duration = Annotated[timedelta, BeforeValidator(_before)]
