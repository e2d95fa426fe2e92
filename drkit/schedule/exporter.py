"""``drkit metrics --serve``: the scheduler's /metrics and health endpoints, without its jobs.

When something else runs the jobs (Kubernetes CronJobs, systemd timers) nothing long-running is
left to scrape: each run exits. The exporter is that long-running process. It serves exactly
what ``drkit schedule`` serves on ``[metrics] listen`` (the same ``HealthServer``, so the same
families, the same ``[metrics] cache`` between scrapes, the same readiness checks), computed from
the repositories alone: the job times come from the job records every run leaves in the primary
repository, so a CronJob that stopped running shows as a job whose last success grows old.

It only reads: repository listings, the newest manifests and records (so the key provider must
unwrap data keys, never create them), and the server's current WAL file for the archive lag
(a plain SQL query, no replication). Read-only storage credentials and a role that may only log
in suffice, and it takes no lock and no lease: several replicas may run, and it never waits for
or holds up a job.
"""

from __future__ import annotations

import logging
import os
import signal

from drkit.config.settings import Settings
from drkit.interrupts import Interrupted, interruptible
from drkit.logs import event
from drkit.repo.open import open_key_provider
from drkit.schedule.health import HealthServer, SchedulerState

log = logging.getLogger(__name__)


def serve_metrics(settings: Settings) -> int:
    """Serve /metrics, /health/live and /health/ready on ``[metrics] listen`` until SIGTERM or
    SIGINT; returns 0 after a clean stop. Raises ConfigError when the address is taken."""
    # Kept open for the process's life: with Vault its renewer keeps the token alive between
    # scrapes, as in the scheduler.
    keys = open_key_provider(settings.keys)
    server = HealthServer(settings, SchedulerState(), keys)
    server.start()
    host, port = server.address
    event(log, "metrics exporter started", listen=f"{host}:{port}", pid=os.getpid())
    stopped_by = ""
    try:
        with interruptible():
            while True:
                signal.pause()  # the handler raises Interrupted; scrapes are served by threads
    except Interrupted as exc:
        stopped_by = exc.signal
    finally:
        server.stop()
    event(log, "metrics exporter stopped", signal=stopped_by)
    return 0
