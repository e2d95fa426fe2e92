"""Job events: when each scheduled job last succeeded and last failed, kept in the repository.

A job run from a systemd timer or a CronJob leaves no process behind to remember it, so the
scheduler and ``drkit backup`` write one small write-once record per run into the primary
repository; metrics and reports read them back::

    events/<job>/<YYYYmmddTHHMMSS.ffffffZ>-ok.json
    events/<job>/<YYYYmmddTHHMMSS.ffffffZ>-fail.json

The outcome and the time are in the key, so the latest success and failure of every job come
from one listing without reading any record. A record holds the job, the outcome, the time, the
duration, the exit code and the first line of the error: no key material (error messages never
carry any) and no configuration values.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from drkit.errors import DrkitError
from drkit.repo.repository import FORMAT_KEY
from drkit.storage.base import Storage

EVENT_PREFIX = "events/"
_STAMP = "%Y%m%dT%H%M%S.%fZ"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobEvent:
    """One run of a job; ``time`` is when it ended."""

    job: str
    ok: bool
    time: datetime
    seconds: float = 0.0
    exit_code: int = 0
    error: str = ""

    @property
    def key(self) -> str:
        outcome = "ok" if self.ok else "fail"
        return f"{EVENT_PREFIX}{self.job}/{self.time.strftime(_STAMP)}-{outcome}.json"

    def as_dict(self) -> dict[str, object]:
        return {
            "job": self.job,
            "ok": self.ok,
            "time": self.time.isoformat(),
            "seconds": round(self.seconds, 3),
            "exit_code": self.exit_code,
            "error": self.error,
        }


@dataclass
class JobTimes:
    """The newest success and failure of one job (None: never)."""

    last_ok: datetime | None = None
    last_fail: datetime | None = None

    def add(self, ok: bool, at: datetime) -> None:
        if ok and (self.last_ok is None or at > self.last_ok):
            self.last_ok = at
        if not ok and (self.last_fail is None or at > self.last_fail):
            self.last_fail = at


def write_event(storage: Storage, event: JobEvent) -> None:
    """Store ``event`` (write-once)."""
    storage.write_bytes(event.key, json.dumps(event.as_dict()).encode())


def job_times(keys: Iterator[str] | list[str]) -> dict[str, JobTimes]:
    """job -> its newest success and failure, from object keys under ``events/`` (others and
    malformed names are ignored)."""
    found: dict[str, JobTimes] = {}
    for key in keys:
        parts = key.split("/")
        if len(parts) != 3 or parts[0] + "/" != EVENT_PREFIX:
            continue
        stamp, _, outcome = parts[2].removesuffix(".json").rpartition("-")
        try:
            at = datetime.strptime(stamp, _STAMP).replace(tzinfo=UTC)
        except ValueError:
            continue
        if outcome in ("ok", "fail"):
            found.setdefault(parts[1], JobTimes()).add(outcome == "ok", at)
    return found


@contextmanager
def recorded(storage: Storage | None, job: str) -> Iterator[None]:
    """Record the ``with`` block as one run of ``job`` in ``storage``: a success when it ends,
    a failure (with the error's first line and exit code) when it raises. A record that cannot
    be written (the repository is what failed) is logged and never hides the job's own error."""
    clock = time.monotonic()
    try:
        yield
    except Exception as exc:
        code = exc.exit_code if isinstance(exc, DrkitError) else 2
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        ended = datetime.now(UTC)
        _write(storage, JobEvent(job, False, ended, time.monotonic() - clock, code, message))
        raise
    _write(storage, JobEvent(job, True, datetime.now(UTC), time.monotonic() - clock))


def _write(storage: Storage | None, event: JobEvent) -> None:
    if storage is None:
        return
    try:
        if not storage.exists(FORMAT_KEY):  # never create a repository by recording a failure
            return
        write_event(storage, event)
    except (DrkitError, OSError) as exc:
        log.warning(
            "the job event could not be recorded",
            extra={"job": event.job, "ok": event.ok, "error": str(exc)},
        )
