"""The scheduler's HTTP endpoints: ``/metrics``, ``/health/live``, ``/health/ready``.

- ``/health/live``: 200 while the scheduler runs (a liveness probe restarts a hung process);
- ``/health/ready``: 200 when the configuration loaded (it did, or the scheduler would not run),
  every repository can be read, and the newest backup is not older than the backup schedule
  allows (its shortest interval plus ``overdue_grace``); 503 otherwise, with the failing checks
  in a JSON body;
- ``/metrics``: drkit/schedule/metrics.py's families; a scrape within ``[metrics] cache`` of the
  previous one gets the same answer, so a busy Prometheus cannot make drkit list a large
  repository continuously.

The server binds to ``[metrics] listen`` (127.0.0.1 by default: the endpoints are not
authenticated; expose them through a reverse proxy or a Kubernetes Service deliberately).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from drkit.config.schedule import BACKUP_JOBS
from drkit.config.settings import Settings
from drkit.crypto.base import KeyProvider
from drkit.errors import ConfigError, DrkitError
from drkit.logs import event
from drkit.repo.drills import drill_time
from drkit.repo.events import JobTimes
from drkit.repo.open import open_storage
from drkit.repo.repository import Repository
from drkit.schedule.metrics import collect, exposition
from drkit.schedule.sizes import SizeCache
from drkit.schedule.triggers import allowed_age

log = logging.getLogger(__name__)


@dataclass
class SchedulerState:
    """What the scheduler knows beyond the repositories: for health and metrics (the metrics
    exporter, which runs no job, has an empty one)."""

    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    jobs: dict[str, JobTimes] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)
    overdue: set[str] = field(default_factory=set)  # notified, until it is no longer overdue
    lock: threading.Lock = field(default_factory=threading.Lock)


def newest_backup(settings: Settings, keys: KeyProvider) -> datetime | None:
    """When the newest complete backup of the primary repository started (from its label)."""
    labels = Repository(open_storage(settings.repo[0]), keys).backups()
    return labels[-1].time if labels else None


def newest_drill(settings: Settings, keys: KeyProvider) -> datetime | None:
    """When the newest drill recorded in the primary repository started (from its id)."""
    ids = Repository(open_storage(settings.repo[0]), keys).drill_ids()
    return drill_time(ids[-1]) if ids else None


class HealthServer:
    def __init__(self, settings: Settings, state: SchedulerState, keys: KeyProvider) -> None:
        self.settings = settings
        self.state = state
        self.keys = keys
        self.sizes = SizeCache(settings.lock_path)  # sizes seen by earlier scrapes
        self._cache_lock = threading.Lock()
        self._cached: tuple[float, bytes] | None = None
        handler = type("Handler", (_Handler,), {"server_ref": self})
        host, port = settings.metrics.address
        try:
            self._httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on '{settings.metrics.listen}': {exc.strerror}",
                hint="set [metrics] listen to a free host:port",
            ) from None
        self._httpd.daemon_threads = True
        self.address: tuple[str, int] = self._httpd.server_address[:2]  # type: ignore[assignment]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="drkit-http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def metrics(self) -> bytes:
        with self._cache_lock:
            now = time.monotonic()
            if self._cached and now - self._cached[0] < self.settings.metrics.cache.total_seconds():
                return self._cached[1]
            with self.state.lock:
                overlay = dict(self.state.jobs)
            body = exposition(collect(self.settings, overlay, self.keys, self.sizes))
            self._cached = (time.monotonic(), body)
            return body

    def readiness(self) -> dict[str, Any]:
        checks: dict[str, str] = {"configuration": "ok"}
        for repo_settings in self.settings.repo:
            try:
                Repository(open_storage(repo_settings), self.keys).check()
                checks[f"repository {repo_settings.name}"] = "ok"
            except DrkitError as exc:
                checks[f"repository {repo_settings.name}"] = exc.message
        now = datetime.now(UTC)
        allowed = allowed_age(self.settings, BACKUP_JOBS, now)
        if allowed is not None:
            try:
                newest = newest_backup(self.settings, self.keys)
                since = max(newest or self.state.started, self.state.started)
                late = now - since > allowed
                checks["newest backup"] = (
                    f"older than {allowed} (started {newest.isoformat(timespec='seconds')})"
                    if late and newest
                    else "none yet, and the schedule allowed one"
                    if late
                    else "ok"
                )
            except DrkitError as exc:
                checks["newest backup"] = exc.message
        return {"ready": all(v == "ok" for v in checks.values()), "checks": checks}


class _Handler(BaseHTTPRequestHandler):
    server_ref: HealthServer

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                self._send(200, self.server_ref.metrics(), CONTENT_TYPE_LATEST)
            elif path == "/health/live":
                self._send(200, b'{"live": true}\n', "application/json")
            elif path == "/health/ready":
                ready = self.server_ref.readiness()
                body = (json.dumps(ready) + "\n").encode()
                self._send(200 if ready["ready"] else 503, body, "application/json")
            else:
                self._send(404, b"not found\n", "text/plain")
        except Exception as exc:  # an answer, not a dead handler thread
            log.exception("http endpoint failed", extra={"path": path})
            self._send(500, f"{type(exc).__name__}\n".encode(), "text/plain")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        event(log, "http request", level=logging.DEBUG, request=format % args)
