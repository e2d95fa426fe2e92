"""Job events: when each scheduled job last succeeded and last failed, kept in the repository.

A job run from a systemd timer or a CronJob leaves no process behind to remember it, so the
scheduler and ``drkit backup``, ``replicate``, ``verify`` and ``prune`` write one small
write-once record per run into the primary repository; metrics, ``info`` and reports read them
back::

    events/<job>/<YYYYmmddTHHMMSS.ffffffZ>-ok.json
    events/<job>/<YYYYmmddTHHMMSS.ffffffZ>-fail.json

The outcome and the time are in the key, so the latest success and failure of every job come
from one listing without reading any record. A record holds the job, the outcome, the time, the
duration, the exit code and the first line of the error: no key material (error messages never
carry any) and no configuration values. An error's first line can still name hosts, paths or
tables, so the record is sealed (``{"sealed": <frame>}``, under a key derived from the
repository's signing key, bound to the object's key: ``RecordAuth.seal``); records written
before sealing are plain JSON and are read as they are.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from drkit.config.settings import Settings
from drkit.errors import ConfigError, DrkitError, IntegrityError, KeyMaterialError, WrongKey
from drkit.repo.open import open_key_provider, open_storage
from drkit.repo.repository import FORMAT_KEY, Repository
from drkit.repo.signer import RecordAuth
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


def write_event(storage: Storage, auth: RecordAuth | None, event: JobEvent) -> None:
    """Store ``event`` in ``storage``, sealed with ``auth`` (write-once). When the signing key
    cannot be had (no ``auth``: the key provider is what failed, Vault down or sealed), the run
    is still recorded, in clear but without its error line, so metrics and reports still count
    the failure."""
    try:
        if auth is None:
            raise KeyMaterialError("the key provider could not be opened")
        sealed = auth.seal(json.dumps(event.as_dict()).encode(), event.key)
        payload: dict[str, Any] = {"sealed": base64.b64encode(sealed).decode("ascii")}
    except (KeyMaterialError, WrongKey, ConfigError) as exc:
        log.debug("the job record is stored without its error line: %s", exc.message)
        payload = {**event.as_dict(), "error": "(not recorded: the key provider was unavailable)"}
    storage.write_bytes(event.key, json.dumps(payload).encode())


def read_event(repo: Repository, key: str) -> dict[str, Any]:
    """The record stored at ``key`` (a sealed one opened, a plain one of an older drkit as it
    is). Raises IntegrityError when it is damaged, forged or moved from another key."""
    try:
        record = json.loads(repo.storage.read_bytes(key))
        if not isinstance(record, dict):
            raise ValueError("not an object")
        if "sealed" in record:
            plain = repo.auth.unseal(base64.b64decode(record["sealed"], validate=True), key)
            record = json.loads(plain)
    except (ValueError, TypeError, binascii.Error):
        raise IntegrityError(f"job record '{key}' does not parse") from None
    if not isinstance(record, dict):
        raise IntegrityError(f"job record '{key}' does not parse")
    return record


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


@dataclass
class JobRun:
    """A run being recorded. A job that completes but did not succeed (a verification found
    damage, a copy failed) says so with ``failed()``; it is recorded as a failure."""

    exit_code: int = 0
    error: str = ""

    def failed(self, exit_code: int, error: str) -> None:
        self.exit_code, self.error = exit_code or 1, error


@contextmanager
def recorded(settings: Settings | None, job: str) -> Iterator[JobRun]:
    """Record the ``with`` block as one run of ``job`` in the primary repository of
    ``settings`` (opened only once the block is over: opening it must not fail the job): a
    success when it ends, a failure (with the error's first line and exit code) when it raises
    or calls ``JobRun.failed()``. A record that cannot be written (the repository is what
    failed) is logged and never hides the job's own error."""
    clock = time.monotonic()
    run = JobRun()
    try:
        yield run
    except Exception as exc:
        code = exc.exit_code if isinstance(exc, DrkitError) else 2
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        ended = datetime.now(UTC)
        _write(settings, JobEvent(job, False, ended, time.monotonic() - clock, code, message))
        raise
    ok, seconds = not run.exit_code, time.monotonic() - clock
    error = run.error.splitlines()[0] if run.error else ""
    _write(settings, JobEvent(job, ok, datetime.now(UTC), seconds, run.exit_code, error))


def _write(settings: Settings | None, event: JobEvent) -> None:
    if settings is None:
        return
    try:
        storage = open_storage(settings.repo[0])
        if not storage.exists(FORMAT_KEY):  # never create a repository by recording
            return
        try:
            auth: RecordAuth | None = RecordAuth(storage, open_key_provider(settings.keys))
        except KeyMaterialError:  # Vault down: the job's failure is still worth recording
            auth = None
        write_event(storage, auth, event)
    except (DrkitError, OSError) as exc:
        log.warning(
            "the job event could not be recorded",
            extra={"job": event.job, "ok": event.ok, "error": str(exc)},
        )
