"""kill -9 at random points: start an operation, kill it after a random delay, report whether it
was still running. The faults campaign (tests/test_kill9.py, scripts/faults_campaign.sh) checks
the repository after every kill."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

# Read at import: the per-test scrub removes DRKIT_* variables from the environment.
TRIALS = int(os.environ.get("DRKIT_FAULT_TRIALS", "1"))


def kill_at_random(
    spawn: Callable[[], subprocess.Popen[str]], rng: random.Random, within: float
) -> bool:
    """Start the operation and SIGKILL it after a random delay below ``within`` seconds (at
    once when it ends earlier); True when it was killed while still running."""
    proc = spawn()
    deadline = time.monotonic() + rng.uniform(0.05, within)
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return running


def drkit_processes(config: Path, *commands: str) -> list[psutil.Process]:
    """This test's drkit processes running one of ``commands`` (found by their configuration
    file, which is the test's own, so nothing else on the host is ever matched)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if str(config) in cmdline and any(c in cmdline for c in commands):
            found.append(proc)
    return found


class RandomKiller:
    """A thread that, until stopped, kills one of this test's ``commands`` processes with
    SIGKILL at random intervals of up to ``every`` seconds, at most ``limit`` times."""

    def __init__(
        self, config: Path, commands: tuple[str, ...], rng: random.Random, every: float, limit: int
    ) -> None:
        self.kills: list[str] = []
        self._config = config
        self._commands = commands
        self._rng = rng
        self._every = every
        self._limit = limit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="random-killer", daemon=True)

    def __enter__(self) -> RandomKiller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while len(self.kills) < self._limit and not self._stop.wait(
            self._rng.uniform(0.01, self._every)
        ):
            victims = drkit_processes(self._config, *self._commands)
            if not victims:
                continue
            victim = self._rng.choice(victims)
            try:
                command = next(c for c in self._commands if c in victim.cmdline())
                victim.send_signal(signal.SIGKILL)
            except (psutil.NoSuchProcess, StopIteration):
                continue
            self.kills.append(command)


def report(what: str, outcome: str) -> None:
    """One line for the campaign's summary (shown with ``pytest -s``; scripts/faults_campaign.sh
    collects them)."""
    print(f"\ncampaign: {what}: {outcome}")
