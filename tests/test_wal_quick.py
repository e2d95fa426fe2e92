"""The quick path of the restore_command drkit restore writes (drkit/wal/quick.py): a segment the
background fetcher has ready is renamed into place by a standard-library script; every other
request goes to the full ``drkit wal-fetch`` command, whose answer PostgreSQL then gets.

Run as PostgreSQL runs it: ``python -I -S quick.py ... -- COMMAND %f %p`` in the data directory.
COMMAND here is a shell that records that it ran and exits 1 ("not archived"), standing for the
full command; the real one is exercised by every PITR test (tests/test_wal_prefetch.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from drkit.private_dir import default_lock_path
from drkit.restore.request import QUICK_FETCH
from drkit.wal import quick

SEGMENT = "000000010000000000000007"
DATA = os.urandom(64 * 1024)


@dataclass
class Setup:
    pgdata: Path
    root: Path
    spool: Path
    ran: Path  # written by the stand-in for the full command

    def request(self, name: str = SEGMENT, **env: str) -> subprocess.CompletedProcess[str]:
        full = ["/bin/sh", "-c", f'echo "$@" > {self.ran}; exit 1', "sh"]
        quick = [sys.executable, "-I", "-S", str(QUICK_FETCH), "--spool-root", str(self.root)]
        return subprocess.run(
            [*quick, "--", *full, name, "pg_wal/RECOVERYXLOG"],
            cwd=self.pgdata,
            capture_output=True,
            text=True,
            env={"PATH": os.environ["PATH"], **env},
            timeout=60,
        )

    @property
    def dest(self) -> Path:
        return self.pgdata / "pg_wal" / "RECOVERYXLOG"


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    """A recovering data directory, its spool with ``SEGMENT`` ready, and a fetcher (this test,
    holding the spool's lock)."""
    pgdata = tmp_path / "data"
    (pgdata / "pg_wal").mkdir(parents=True)
    (pgdata / "postmaster.pid").write_text(f"{os.getpid()}\n")
    (pgdata / "recovery.signal").touch()
    root = tmp_path / "locks"
    spool = root / quick.spool_name(str(pgdata.resolve()))
    spool.mkdir(parents=True, mode=0o700)
    (spool / SEGMENT).write_bytes(DATA)
    (spool / (SEGMENT + quick.INFO)).write_text("local\n")
    with open(spool / quick.LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield Setup(pgdata, root, spool, tmp_path / "full-command-ran")


def test_a_ready_segment_is_renamed_into_place_without_the_full_command(setup: Setup) -> None:
    done = setup.request()
    assert done.returncode == 0, done.stderr
    assert setup.dest.read_bytes() == DATA
    assert not setup.ran.exists()
    assert sorted(p.name for p in setup.spool.iterdir()) == [quick.LOCK_FILE, quick.WANT_FILE]
    want = (setup.spool / quick.WANT_FILE).read_text()
    assert quick.request_line(want)[0] == SEGMENT  # the fetcher moves on


def _no_fetcher(s: Setup) -> None:
    lock = s.spool / quick.LOCK_FILE
    lock.unlink()
    lock.touch()  # a lock file nobody holds


def _not_spooled(s: Setup) -> None:
    (s.spool / SEGMENT).unlink()


def _with_a_notice(s: Setup) -> None:
    (s.spool / (SEGMENT + quick.INFO)).write_text("offsite\nWAL file fetched from 'offsite'\n")


def _a_link(s: Setup) -> None:
    (s.spool / SEGMENT).unlink()
    (s.spool / SEGMENT).symlink_to(s.pgdata / "postmaster.pid")


def _spool_writable_by_others(s: Setup) -> None:
    s.spool.chmod(0o777)


def _recovery_over(s: Setup) -> None:
    (s.pgdata / "recovery.signal").unlink()


@pytest.mark.parametrize(
    "change",
    [_no_fetcher, _not_spooled, _with_a_notice, _a_link, _spool_writable_by_others, _recovery_over],
)
def test_anything_else_is_answered_by_the_full_command(setup: Setup, change: object) -> None:
    assert callable(change)
    change(setup)
    done = setup.request()
    assert done.returncode == 1  # the full command's answer is PostgreSQL's
    assert setup.ran.read_text() == f"{SEGMENT} pg_wal/RECOVERYXLOG\n"
    assert not setup.dest.exists()
    if change is not _not_spooled:
        assert os.path.lexists(setup.spool / SEGMENT)  # left for the full command


def test_a_ready_history_file_is_served_and_configuration_from_the_environment_is_not(
    setup: Setup,
) -> None:
    history = "00000002.history"
    text = "1\t0/5000000\tno recovery target specified\n"
    (setup.spool / history).write_text(text)
    (setup.spool / (history + quick.INFO)).write_text("local\n")
    assert setup.request(history).returncode == 0
    assert setup.dest.read_text() == text
    assert not setup.ran.exists()
    assert setup.request(DRKIT_ARCHIVE__SPOOL_PATH="/elsewhere").returncode == 1
    assert setup.ran.exists()
    assert (setup.spool / SEGMENT).read_bytes() == DATA


def test_the_default_spool_root_is_drkits_default_lock_path() -> None:
    assert quick._default_root() == str(default_lock_path())
    digest = hashlib.sha256(b"/var/lib/postgresql/15/main").hexdigest()[:12]
    assert quick.spool_name("/var/lib/postgresql/15/main") == f"fetch-{digest}"
