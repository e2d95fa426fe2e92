"""``drkit schedule``: run the ``[schedule]`` jobs, serve /metrics and the health endpoints.

How jobs run together (apscheduler 3, BlockingScheduler):

- each job has ``max_instances=1`` and ``coalesce``: a run never overlaps itself, and runs missed
  while it was busy (or the host slept, within ``misfire_grace``) collapse into one;
- different jobs may fire together; those that need the repository (a full and an incr, a
  backup and a prune) take the same kernel lock the command line takes, and a job that finds it
  held waits for it (up to ``lock_wait``) instead of failing, so two backups never run at once;
- one scheduler per cluster: the scheduler holds its own lock (per primary repository) for its
  whole life, and a second one refuses to start.

On SIGTERM or SIGINT nothing new starts, jobs waiting for a lock give up, drill and report
subprocesses get SIGTERM, and running jobs get ``stop_timeout`` to finish. A job still running
after that is abandoned and the process exits 0: a backup is safe to abandon at any instant
(its manifest is written last, so it is never listed, and the next backup removes its objects;
PostgreSQL ends the backup when the connection closes).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from apscheduler.events import EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.blocking import BlockingScheduler

from drkit.config.schedule import BACKUP_JOBS
from drkit.config.settings import Settings
from drkit.crypto.base import KeyProvider
from drkit.errors import DrkitError, LockError
from drkit.logs import event
from drkit.repo.events import JobTimes, recorded
from drkit.repo.lock import operation_lock
from drkit.repo.open import open_key_provider, repo_location
from drkit.schedule.health import HealthServer, SchedulerState, newest_backup, newest_drill
from drkit.schedule.jobs import JOBS, JobContext, JobFailed
from drkit.schedule.notify import Notification, Notifier
from drkit.schedule.triggers import allowed_age, triggers

log = logging.getLogger(__name__)

LOCK_POLL = 1.0  # seconds between attempts at a held repository lock
WATCH_INTERVAL = 60  # seconds between overdue checks, at most


class Scheduler:
    def __init__(self, settings: Settings, config: Path) -> None:
        self.settings = settings
        self.config = config
        self.state = SchedulerState()
        self.stopping = threading.Event()
        self.notifier = Notifier(settings.notify)
        self.ctx = JobContext(settings, config, set(), threading.Lock())
        self.keys: KeyProvider | None = None  # opened in run(), kept for the scheduler's life
        self._scheduler = BlockingScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=len(JOBS) + 1)},
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": int(settings.schedule.misfire_grace.total_seconds()) or 1,
            },
            timezone=settings.schedule.timezone,
        )

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the exit code (0 after a clean stop)."""
        primary = self.settings.repo[0]
        with operation_lock(self.settings.lock_path, repo_location(primary), "scheduler"):
            # A key provider kept open for the scheduler's life: with Vault its renewer thread
            # keeps the token alive between jobs (each job logs in with the same token).
            self.keys = keys = open_key_provider(self.settings.keys)
            self.notifier.start()
            health = HealthServer(self.settings, self.state, keys)
            health.start()
            if not self.settings.schedule.jobs():
                event(
                    log,
                    "no job is scheduled: add cron expressions to [schedule]",
                    level=logging.WARNING,
                )
            for job, trigger in triggers(self.settings).items():
                self._scheduler.add_job(self._run_job, trigger, args=[job], id=job, name=job)
            self._scheduler.add_job(
                self._watch, "interval", seconds=self._watch_interval(), id="-watch"
            )
            self._scheduler.add_listener(self._missed, EVENT_JOB_MISSED)
            previous = {
                s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)
            }
            event(
                log,
                "scheduler started",
                jobs=sorted(self.settings.schedule.jobs()),
                listen=f"{health.address[0]}:{health.address[1]}",
                pid=os.getpid(),
            )
            try:
                self._scheduler.start()  # returns once _on_signal shut it down
            finally:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
            self._finish_running()
            health.stop()
            self.notifier.stop(timeout=2)
        event(log, "scheduler stopped")
        return 0

    # -- jobs -------------------------------------------------------------------------------------

    def _run_job(self, job: str) -> None:
        started = time.monotonic()
        with self.state.lock:
            self.state.running.add(job)
        event(log, "job started", job=job)
        ok, detail = False, ""
        try:
            with recorded(self.settings, job):
                detail = self._with_lock_wait(job)
            ok = True
        except JobFailed as exc:
            detail = exc.message
            kind = "drill-failed" if exc.drill_failed else "job-failed"
            self.notifier.send(Notification(kind, f"{job}: {exc.message}", {"job": job}))
        except DrkitError as exc:
            detail = exc.message
            self.notifier.send(
                Notification("job-failed", f"{job} failed: {exc.message}", {"job": job})
            )
        except Exception as exc:  # a bug must not stop the scheduler; it is logged and reported
            log.exception("job crashed", extra={"job": job})
            detail = f"{type(exc).__name__}: {exc}"
            self.notifier.send(Notification("job-failed", f"{job} crashed: {detail}", {"job": job}))
        finally:
            with self.state.lock:
                self.state.running.discard(job)
                self.state.jobs.setdefault(job, JobTimes()).add(ok, datetime.now(UTC))
        event(
            log,
            "job finished",
            level=logging.INFO if ok else logging.ERROR,
            job=job,
            ok=ok,
            seconds=round(time.monotonic() - started, 3),
            detail=detail,
        )

    def _with_lock_wait(self, job: str) -> str:
        """Run ``job``; while the repository lock is held by someone else, wait and retry."""
        deadline = time.monotonic() + self.settings.schedule.lock_wait.total_seconds()
        waited = False
        while True:
            try:
                return JOBS[job](self.ctx)
            except LockError as exc:
                if self.stopping.is_set() or time.monotonic() >= deadline:
                    raise
                if not waited:
                    event(log, "job waiting for the repository lock", job=job, holder=exc.message)
                    waited = True
                self.stopping.wait(LOCK_POLL)

    def _missed(self, ev: JobExecutionEvent) -> None:
        event(log, "job run missed", level=logging.WARNING, job=ev.job_id)

    # -- overdue ----------------------------------------------------------------------------------

    def _watch_interval(self) -> int:
        """A minute, or a quarter of the shortest allowed age when that is shorter."""
        now = datetime.now(UTC)
        ages = [allowed_age(self.settings, jobs, now) for jobs in (BACKUP_JOBS, ("drill",))]
        seconds = [age.total_seconds() / 4 for age in ages if age is not None]
        return max(1, int(min([WATCH_INTERVAL, *seconds])))

    def _watch(self) -> None:
        """Notify once when a backup or the drill is older than its schedule allows."""
        now = datetime.now(UTC)
        checks = {
            "backup-overdue": (allowed_age(self.settings, BACKUP_JOBS, now), newest_backup),
            "drill-overdue": (allowed_age(self.settings, ("drill",), now), newest_drill),
        }
        for kind, (allowed, newest) in checks.items():
            if allowed is None:
                continue
            try:
                assert self.keys is not None
                last = newest(self.settings, self.keys) or self.state.started
            except DrkitError:
                continue  # unreachable: readiness and job failures report that
            late = now - max(last, self.state.started) > allowed
            if late and kind not in self.state.overdue:
                self.state.overdue.add(kind)
                what = kind.split("-")[0]
                self.notifier.send(
                    Notification(kind, f"no {what} since {last.isoformat(timespec='seconds')}", {})
                )
            elif not late:
                self.state.overdue.discard(kind)

    # -- stopping ---------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping.is_set():
            return
        self.stopping.set()
        event(log, "scheduler stopping", signal=signal.Signals(signum).name)
        # shutdown takes the scheduler's locks: not from inside a signal handler
        threading.Thread(target=self._scheduler.shutdown, kwargs={"wait": False}).start()

    def _finish_running(self) -> None:
        with self.ctx.children_lock:
            for child in self.ctx.children:
                child.terminate()
        deadline = time.monotonic() + self.settings.schedule.stop_timeout.total_seconds()
        while time.monotonic() < deadline:
            with self.state.lock:
                running = sorted(self.state.running)
            if not running:
                return
            time.sleep(0.1)
        event(log, "scheduler abandoning running jobs", level=logging.WARNING, jobs=running)
        with self.ctx.children_lock:
            for child in self.ctx.children:
                child.kill()
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        os._exit(0)  # worker threads cannot be stopped; a killed backup is never listed
