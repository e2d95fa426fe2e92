"""What every operation returns: typed warnings, timings per phase, one exit code, one JSON shape.

Drills, the scheduler and the CLI read results the same way: ``exit_code`` (0, or the code of the
warnings collected; errors are raised, never returned), ``as_dict()`` for JSON, and ``phases``,
the wall-clock seconds of each named step (``time.monotonic``), which a drill records as the
RTO's parts. This module imports nothing heavy: wal-fetch uses it on PostgreSQL's critical path.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from drkit.errors import DrkitWarning

SEVERAL_WARNINGS = 1  # the exit code when warnings of more than one kind were collected


def warnings_exit_code(warnings: list[DrkitWarning]) -> int:
    """0 without warnings; the warnings' own code when they are of one kind; else 1."""
    codes = {w.exit_code for w in warnings}
    if not codes:
        return 0
    return codes.pop() if len(codes) == 1 else SEVERAL_WARNINGS


@dataclass(kw_only=True)
class OperationResult:
    """The part every result shares. Subclasses add their data and list it in ``_data()``."""

    warnings: list[DrkitWarning] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # step -> wall-clock seconds

    @property
    def exit_code(self) -> int:
        return warnings_exit_code(self.warnings)

    def _data(self) -> dict[str, Any]:
        return {}

    def as_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data: the subclass's keys, then warnings, phases, exit_code."""
        return {
            **self._data(),
            "warnings": [w.as_dict() for w in self.warnings],
            "phases": {name: round(seconds, 6) for name, seconds in self.phases.items()},
            "exit_code": self.exit_code,
        }

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Adds the wall-clock time of the ``with`` block to ``phases[name]`` (also on error)."""
        start = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.monotonic() - start


class Stopwatch:
    """Times consecutive steps without nesting them in ``with`` blocks: ``lap(name)`` adds the
    time since the previous lap (or since the stopwatch was made) to ``phases[name]``."""

    def __init__(self, phases: dict[str, float]) -> None:
        self.phases = phases
        self._last = time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._last
        self._last = now
