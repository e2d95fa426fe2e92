"""Webhooks: tell someone when a job failed, a drill failed, or a backup or drill is overdue.

A notification must never hold up a job nor take the scheduler down: ``Notifier.send`` puts the
event on a bounded queue and returns; one thread posts it to every webhook that wants it, with
retries and exponential backoff. When the queue is full (a webhook down for long) new events are
dropped and logged. URLs are secrets (a Slack webhook URL is its own credential): read once
from a file or the environment at start, never logged, never in an error message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from drkit.config.schedule import NotifySettings
from drkit.errors import ConfigError
from drkit.logs import event

log = logging.getLogger(__name__)

FIRST_RETRY = 1.0  # seconds; doubled after each failed attempt
MAX_RETRY = 60.0


@dataclass(frozen=True)
class Notification:
    kind: str  # job-failed | drill-failed | backup-overdue | drill-overdue
    summary: str  # one line for people
    fields: dict[str, Any]

    def payload(self, fmt: str, host: str) -> bytes:
        if fmt == "slack":
            return json.dumps({"text": f"drkit on {host}: {self.summary}"}).encode()
        body = {
            "source": "drkit",
            "host": host,
            "event": self.kind,
            "summary": self.summary,
            "time": datetime.now(UTC).isoformat(),
            **self.fields,
        }
        return json.dumps(body, default=str).encode()


@dataclass(frozen=True)
class _Target:
    name: str
    url: str
    format: str
    events: frozenset[str]
    timeout: float
    attempts: int

    def __repr__(self) -> str:  # never the URL
        return f"_Target({self.name!r})"


class Notifier:
    """Posts notifications from a background thread. ``start()`` reads every URL (ConfigError
    naming the webhook, never its URL, when one cannot be read)."""

    def __init__(self, settings: NotifySettings) -> None:
        self._settings = settings
        self._targets: list[_Target] = []
        self._queue: queue.Queue[Notification | None] = queue.Queue(maxsize=settings.queue)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._host = socket.gethostname()
        self.sent = 0
        self.dropped = 0

    def start(self) -> None:
        for hook in self._settings.webhooks:
            try:
                url = hook.url()
            except ValueError as exc:
                raise ConfigError(
                    f"webhook '{hook.name}': {exc}",
                    hint="url_file must hold the URL (one line), url_env must name a set variable",
                ) from None
            self._targets.append(
                _Target(
                    hook.name, url, hook.format, frozenset(hook.events), hook.timeout, hook.attempts
                )
            )
        if self._targets:
            self._thread = threading.Thread(target=self._run, name="drkit-notify", daemon=True)
            self._thread.start()

    def send(self, notification: Notification) -> None:
        """Queue ``notification``; never blocks."""
        if not any(notification.kind in t.events for t in self._targets):
            return
        try:
            self._queue.put_nowait(notification)
        except queue.Full:
            self.dropped += 1
            event(
                log,
                "notification dropped: queue full",
                level=logging.WARNING,
                kind=notification.kind,
            )

    def stop(self, timeout: float) -> None:
        """Stop after what is queued has been tried, waiting at most ``timeout`` seconds."""
        if self._thread is None:
            return
        self._stopping.set()
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            for target in self._targets:
                if item.kind in target.events:
                    self._deliver(target, item)

    def _deliver(self, target: _Target, item: Notification) -> None:
        body = item.payload(target.format, self._host)
        delay = FIRST_RETRY
        for attempt in range(1, target.attempts + 1):
            problem = _post(target, body)
            if problem is None:
                self.sent += 1
                event(log, "notification sent", webhook=target.name, kind=item.kind)
                return
            if attempt == target.attempts or self._stopping.is_set():
                break
            event(
                log,
                "notification failed, retrying",
                level=logging.WARNING,
                webhook=target.name,
                attempt=attempt,
                retry_seconds=delay,
                error=problem,
            )
            time.sleep(delay)
            delay = min(delay * 2, MAX_RETRY)
        event(
            log,
            "notification given up",
            level=logging.ERROR,
            webhook=target.name,
            kind=item.kind,
            error=problem,
        )


def _post(target: _Target, body: bytes) -> str | None:
    """POST ``body``; None on a 2xx answer, else why (never naming the URL)."""
    request = urllib.request.Request(  # noqa: S310 - the settings accept http(s) URLs only
        target.url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "drkit"},
    )
    try:
        with urllib.request.urlopen(request, timeout=target.timeout) as response:  # noqa: S310 - the settings accept http(s) URLs only
            response.read()
        return None
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return type(reason).__name__ if not isinstance(reason, str) else "unreachable"
