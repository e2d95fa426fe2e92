"""What each scheduled job does: one operation, called as a library, or a drkit subprocess.

Backups, replication, verification, pruning and the heartbeat run in the scheduler's process:
they are the operations the CLI calls, they are safe to abandon at any instant (nothing is
listed before its manifest), and no process start is paid per run.

A drill and a report run as ``drkit drill --json`` / ``drkit report`` subprocesses instead. A
drill starts and stops a sandbox PostgreSQL server, installs its own signal handling and may
run for hours; in a child process a hung or crashing sandbox cannot take the scheduler (and
its /metrics and health endpoints) with it, and on shutdown the child is sent SIGTERM and
cleans its sandbox up itself, which a thread cannot be made to do.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from drkit.backup.operation import take_backup
from drkit.config.settings import Settings
from drkit.errors import DrkitError, LockError
from drkit.heartbeat.operation import HeartbeatOperation
from drkit.logs import event
from drkit.prune.operation import prune_repositories
from drkit.replicate.operation import replicate_repositories
from drkit.repo.label import BackupType
from drkit.verify.operation import verify_backups

log = logging.getLogger(__name__)

DRILL_FAILED_CODES = frozenset({30, 31, 32})  # drkit drill: restore, check, target missed
CHILD_STOP_TIMEOUT = 20.0  # seconds a drill or report gets to clean up after SIGTERM


class JobFailed(DrkitError):
    """A scheduled job ran but did not succeed (a verification found damage, a copy failed, a
    drill failed); ``exit_code`` is the code the command line would have exited with."""

    def __init__(self, message: str, exit_code: int, drill_failed: bool = False) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.drill_failed = drill_failed


@dataclass
class JobContext:
    settings: Settings
    config: Path
    children: set[subprocess.Popen[str]]
    children_lock: threading.Lock


def _backup(kind: BackupType) -> Callable[[JobContext], str]:
    def run(ctx: JobContext) -> str:
        result = take_backup(ctx.settings, kind)
        for warning in result.warnings:  # the backup is committed: a success to look at
            event(
                log,
                "backup warning",
                level=logging.WARNING,
                code=warning.exit_code,
                warning=warning.message,
            )
        return f"backup {result.manifest.label}"

    return run


def _replicate(ctx: JobContext) -> str:
    result = replicate_repositories(ctx.settings)
    locked = [r for r in result.repos if r.locked]
    if locked:  # a backup is writing there: the scheduler waits for the lock and runs again
        raise LockError(str(locked[0].error))
    if result.failure:
        raise JobFailed(result.failure, result.exit_code)
    return f"{sum(len(r.copied_backups) for r in result.repos)} backups copied"


def _verify(ctx: JobContext) -> str:
    report = verify_backups(ctx.settings, wal=True)
    if report.failure:
        raise JobFailed(report.failure, report.exit_code)
    return "verified"


def _prune(ctx: JobContext) -> str:
    report = prune_repositories(ctx.settings)
    if report.failure:
        raise JobFailed(report.failure, report.exit_code)
    return "pruned"


def _heartbeat(ctx: JobContext) -> str:
    HeartbeatOperation(ctx.settings, once=True).run()
    return "heartbeat written"


def report_quarter(today: date) -> str:
    """The quarter of the day before ``today``: run on a quarter's first day, the quarter that
    just ended; on any other day, the current one so far ('2027-01-01' -> '2026Q4')."""
    day = today - timedelta(days=1)
    return f"{day.year}Q{(day.month - 1) // 3 + 1}"


def _report_args(ctx: JobContext) -> list[str]:
    """The DR report of ``report_quarter`` into ``[schedule] report_dir``."""
    out = ctx.settings.schedule.report_dir
    out.mkdir(mode=0o750, parents=True, exist_ok=True)
    return ["--quarter", report_quarter(datetime.now(UTC).date()), "--out", str(out)]


def _command(
    *args: str, extra: Callable[[JobContext], list[str]] | None = None
) -> Callable[[JobContext], str]:
    def run(ctx: JobContext) -> str:
        argv = [sys.executable, "-m", "drkit", *args, *(extra(ctx) if extra else [])]
        argv += ["--config", str(ctx.config)]
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)  # noqa: S603 - this interpreter and drkit's own arguments
        with ctx.children_lock:
            ctx.children.add(child)
        try:
            out, _ = child.communicate()
        finally:
            with ctx.children_lock:
                ctx.children.discard(child)
        what = f"drkit {args[0]}"
        if child.returncode in DRILL_FAILED_CODES and args[0] == "drill":
            raise JobFailed(f"drill failed: {_reason(out)}", child.returncode, drill_failed=True)
        if child.returncode < 0:
            raise JobFailed(f"{what} was stopped by signal {-child.returncode}", 2)
        if child.returncode != 0:
            raise JobFailed(f"{what} exited with {child.returncode}", child.returncode)
        return f"{what} done"

    return run


def _reason(out: str) -> str:
    try:
        data = json.loads(out)
    except ValueError:
        return "see the drill's log"
    reason = data.get("reason") if isinstance(data, dict) else None
    return str(reason or "see the drill's log")


JOBS: dict[str, Callable[[JobContext], str]] = {
    "full": _backup(BackupType.FULL),
    "diff": _backup(BackupType.DIFF),
    "incr": _backup(BackupType.INCR),
    "replicate": _replicate,
    "verify": _verify,
    "prune": _prune,
    "drill": _command("drill", "--json", "--started-by", "scheduler"),
    "heartbeat": _heartbeat,
    "report": _command("report", extra=_report_args),
}
