"""What drills killed outright leave behind is found and removed by the next drill; what an
operator kept, and what a running drill holds, is not."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

from drkit.drill.sandbox import LOCK_NAME, create_sandbox, remove_stale_sandboxes

# A stand-in for a server (or a pg_ctl still starting one): it names its data directory in its
# command line and ends on SIGQUIT, as the postmaster does.
_SERVER = """
import signal, sys, time
signal.signal(signal.SIGQUIT, lambda *_: sys.exit(0))
print("ready", flush=True)
time.sleep(60)
"""


def _directory(path: Path, *, lock: bool, content: bool = True) -> Path:
    path.mkdir()
    if lock:
        (path / LOCK_NAME).touch()
    if content:
        (path / "pgdata").mkdir()
        (path / "pgdata" / "PG_VERSION").write_text("18\n")
    return path


def _server(pgdata: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER, "-D", str(pgdata)], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    return proc


def test_the_leftovers_of_killed_drills_are_removed_and_nothing_else(workdir: Path) -> None:
    parent = workdir / "sandboxes"
    parent.mkdir()
    killed = _directory(parent / "drill-a", lock=True)
    half_made = _directory(parent / ".drill-b.new", lock=True, content=False)
    old_unlocked = _directory(parent / ".drill-c.new", lock=False, content=False)
    os.utime(old_unlocked, (time.time() - 120, time.time() - 120))
    half_removed = _directory(parent / ".drill-d.gone", lock=False)
    being_made = _directory(parent / ".drill-e.new", lock=False, content=False)
    kept = _directory(parent / "drill-f", lock=False)
    running = _directory(parent / "drill-g", lock=True)
    other = _directory(parent / "not-a-drill", lock=True)
    held = os.open(running / LOCK_NAME, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    # A server still starting in the killed drill's sandbox (no postmaster.pid yet), one in the
    # half-removed one (named by the path it had), and a process of a similar name
    starting = _server(killed / "pgdata")
    renamed = _server(parent / "drill-d" / "pgdata")
    neighbour = _server(parent / "drill-aa" / "pgdata")
    try:
        removed = remove_stale_sandboxes(parent)
        assert starting.wait(1) == 0 and renamed.wait(1) == 0
        assert neighbour.poll() is None
    finally:
        os.close(held)
        for proc in (starting, renamed, neighbour):
            proc.kill()
            proc.communicate()
    assert sorted(removed) == sorted([killed, half_made, old_unlocked, half_removed])
    assert sorted(p.name for p in parent.iterdir()) == sorted(
        p.name for p in (being_made, kept, running, other)
    )
    assert (kept / "pgdata" / "PG_VERSION").read_text() == "18\n"


def test_a_sandbox_has_its_name_only_while_whole_and_locked(workdir: Path) -> None:
    parent = workdir / "sandboxes"
    sandbox = create_sandbox(parent, "drill-x", forbidden=[], needed_bytes=0, server_user=None)
    assert sorted(p.name for p in parent.iterdir()) == ["drill-x"]
    assert [p.name for p in sandbox.root.iterdir()] == [LOCK_NAME]
    assert remove_stale_sandboxes(parent) == []  # its lock is held
    (sandbox.pgdata / "base").mkdir(parents=True)
    sandbox.remove()
    assert list(parent.iterdir()) == []
