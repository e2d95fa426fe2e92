"""What every benchmark shares: the test rig on ``sys.path`` (import this module before
``rig``), a scratch directory cleaned up on the way out, an idle machine and a cold page cache
before each measured step, and the measuring helpers: run a command and record what it cost.

Python's standard library plus GNU time (``/usr/bin/time``). The numbers and how they are taken:

- wall time: ``time.monotonic()`` around the command;
- CPU time: user + system time of the command and of every descendant it waited for, from
  ``wait4`` as reported by GNU time (the kernel reports the child's own usage plus that of its
  reaped descendants, so a shell pipeline or a tool that forks workers is counted whole);
- peak RSS: ``ru_maxrss`` from the same ``wait4`` call, i.e. the largest resident set of any single
  process of the command (for a pipeline: the max over its members). Because a multi-process
  tool's processes are resident at the same time, ``TreeRssSampler`` also samples the *sum* of the
  resident sets of the whole process tree every 0.1 s;
- server CPU: user + system time spent by the PostgreSQL server the step talks to (walsender, the
  checkpointer, archive_command, the startup process of a restored cluster...), from
  ``/proc/<pid>/stat`` of the postmaster (its ``cutime``/``cstime`` cover exited children) and its
  live children.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
# The test rig (tests/rig: throwaway PostgreSQL clusters, S3 servers) and drkit's own sources
for _path in (REPO_ROOT, REPO_ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

PG_VERSION = 15  # Debian's, which pgBackRest's package goes with
DRKIT = REPO_ROOT / ".venv" / "bin" / "drkit"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MiB = 1024 * 1024
TIME = "/usr/bin/time"  # GNU time (Debian package "time")


@dataclass
class Measurement:
    """What one step (a backup, or a restore up to a promoted cluster) cost."""

    tool: str
    step: str  # "backup" | "restore"
    wall_s: float = 0.0
    cpu_s: float = 0.0  # user + sys of the tool's processes
    server_cpu_s: float = 0.0  # user + sys of PostgreSQL processes during the step
    machine_cpu_s: float = 0.0  # busy CPU of the whole machine during the step (noise check)
    max_rss_mib: float = 0.0  # largest single process (ru_maxrss)
    tree_rss_mib: float = 0.0  # sampled peak of the sum over the tool's process tree
    size_bytes: int = 0  # what the backup occupies (backup step only)
    detail: dict[str, float] = field(default_factory=dict)  # sub-timings (restore: tool, start)
    verified: str = ""  # result of the data check after a restore

    @property
    def other_cpu_s(self) -> float:
        """Busy CPU on the machine that neither the tool nor PostgreSQL used: our own polling,
        kernel writeback, and whatever else runs on the machine."""
        return self.machine_cpu_s - self.cpu_s - self.server_cpu_s

    @property
    def noisy(self) -> bool:
        """Did something else plausibly compete for the CPUs during this step?"""
        return self.other_cpu_s > 0.5 + 0.25 * (self.cpu_s + self.server_cpu_s)


@dataclass
class RunResult:
    wall_s: float
    cpu_s: float
    max_rss_mib: float
    tree_rss_mib: float


class CommandFailed(RuntimeError):
    pass


def run_measured(
    cmd: list[str], *, log: Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> RunResult:
    """Run ``cmd`` to completion with stdout+stderr appended to ``log``; raise on non-zero exit.

    The command runs under GNU time, which reports the ``wait4`` usage of the command for us. We
    cannot take ``ru_maxrss`` from our own ``wait4``: the kernel starts a child's peak RSS at the
    RSS of the process it was forked from, so every command would "use" at least this Python
    process's ~60 MiB. ``time`` is a ~2 MiB process, which is the floor of the peaks reported.
    """
    usage_file = log.with_suffix(".usage")
    timed = [TIME, "-f", "%U %S %M", "-o", str(usage_file), *cmd]
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        started = time.monotonic()
        proc = subprocess.Popen(timed, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        sampler = TreeRssSampler(proc.pid)
        sampler.start()
        returncode = proc.wait()
        wall = time.monotonic() - started
        sampler.stop()
    if returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise CommandFailed(f"{' '.join(cmd)} exited {returncode}; log {log}:\n{tail}")
    # GNU time writes "Command exited with non-zero status" first when it fails; we checked.
    user, system, max_rss_kib = usage_file.read_text().split()[-3:]
    usage_file.unlink()
    return RunResult(
        wall_s=wall,
        cpu_s=float(user) + float(system),
        max_rss_mib=int(max_rss_kib) / 1024,
        tree_rss_mib=sampler.peak_bytes / MiB,
    )


class TreeRssSampler(threading.Thread):
    """Samples the summed RSS of a process and all its descendants until stopped."""

    def __init__(self, root_pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.interval = interval
        self.peak_bytes = 0
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.is_set():
            self.peak_bytes = max(self.peak_bytes, tree_rss_bytes(self.root_pid, own=False))
            self._stopped.wait(self.interval)

    def stop(self) -> None:
        self._stopped.set()
        self.join()


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (field 3 onwards), or None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _proc_stat(int(name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(name))  # fields[1] is ppid
    return children


def _descendants(root_pid: int) -> list[int]:
    children = _children_by_parent()
    found, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def tree_rss_bytes(root_pid: int, *, own: bool = True) -> int:
    """Summed RSS of ``root_pid``'s descendants, and of ``root_pid`` itself when ``own``."""
    total = 0
    for pid in _descendants(root_pid):
        if pid == root_pid and not own:
            continue
        try:
            resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        total += resident * PAGE_SIZE
    return total


def postgres_cpu_seconds(pgdata: Path) -> float:
    """User + system CPU seconds used so far by the server of ``pgdata`` and its children
    (exited children are in the postmaster's cutime/cstime). 0 if it is not running."""
    try:
        postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    ticks = 0
    for pid in _descendants(postmaster):
        fields = _proc_stat(pid)
        if fields is not None:
            # utime, stime, cutime, cstime are fields 14-17 of stat, 11-14 here (0-based from 3)
            ticks += sum(int(v) for v in fields[11:15])
    return ticks / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (not idle, not waiting for I/O) since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def wait_until_quiet(max_busy: float = 0.1, quiet_seconds: int = 3, timeout: float = 600) -> bool:
    """Wait until the machine has been idle (under ``max_busy`` of its CPUs busy) for
    ``quiet_seconds`` seconds in a row, so that other work on a shared machine does not land in
    a measurement. False on timeout."""
    cpus = os.cpu_count() or 1
    deadline = time.monotonic() + timeout
    quiet = 0
    while quiet < quiet_seconds:
        if time.monotonic() > deadline:
            return False
        before = machine_busy_seconds()
        time.sleep(1)
        quiet = quiet + 1 if machine_busy_seconds() - before < max_busy * cpus else 0
    return True


def drop_page_cache() -> bool:
    """sync, then drop the page cache, dentries and inodes. False if the kernel refused."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def cached_mib() -> float:
    """The page cache size ("Cached" in /proc/meminfo)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1]) / 1024
    return 0.0


def tree_size(path: Path) -> int:
    """Apparent size (sum of file sizes) of a file or of every file below a directory."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


@contextmanager
def scratch_dir(prefix: str, parent: Path | None = None, *, keep: bool = False) -> Iterator[Path]:
    """A fresh directory under ``parent`` (default: the system's temporary directory), mode
    0755 so that PostgreSQL's user reaches the clusters in it. On the way out (also on an error
    or Ctrl-C) every cluster under it is stopped and it is removed; with ``keep`` both stay and
    its path is printed."""
    from rig.postgres import stop_clusters_under

    root = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    root.chmod(0o755)
    try:
        yield root
    finally:
        if keep:
            print(f"kept {root}")
        else:
            stop_clusters_under(root)
            shutil.rmtree(root, ignore_errors=True)


def prepare_step(quiet_timeout: float = 600, *, drop_cache: bool = True) -> None:
    """Before a measured step: wait for an idle machine (up to ``quiet_timeout`` seconds: it
    may be shared; measured anyway, with a warning, when it stays busy), then drop the page
    cache."""
    if not wait_until_quiet(timeout=quiet_timeout):
        print(f"    WARNING: the machine stayed busy for {quiet_timeout:g}s; numbers may be off")
    if drop_cache:
        drop_page_cache()
