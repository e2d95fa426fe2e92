"""drkit schedule and drkit metrics: idle cost, trigger latency, metrics on a large repository.

1. Builds a PostgreSQL 15 cluster (the test rig's) with WAL archiving into a drkit repository,
   takes one real full and one real incremental backup, then adds synthetic objects beside them:
   older backups (a data object, a key record and a manifest each, never decrypted) up to
   ``--backups`` in all, and archived WAL objects (64 bytes each, named below the real ones) up to
   ``--segments`` in all.
2. ``drkit metrics --textfile``: wall time of the whole command (process start, imports, listing,
   the newest manifests, the server query, the atomic write), best of ``--repeat``; and the time
   of ``collect()`` alone, in this process.
3. ``drkit schedule`` idle (jobs scheduled far in the future): CPU share and RSS over
   ``--idle-seconds``, from /proc, after 5 s of settling.
4. Trigger latency: ``drkit schedule`` with a heartbeat every second; for each run the delay
   between the second it was due and its "job started" log line (median, max).

Run as root with the project's venv: ``.venv/bin/python bench/bench_schedule.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from common import PG_VERSION
from rig.archive import enable_archiving
from rig.drkit import DRKIT, Drkit
from rig.postgres import (
    chown_to_server_user,
    clone_cluster,
    make_rig_dir,
    make_template,
    stop_clusters_under,
)

from drkit.config.settings import load_settings
from drkit.repo.label import BackupLabel, BackupType
from drkit.schedule.metrics import collect
from drkit.schedule.sizes import SizeCache

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def build(root: Path, backups: int, segments: int) -> Drkit:
    cluster = clone_cluster(make_template(PG_VERSION, root), PG_VERSION, root)
    cluster.start()
    cluster.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 100000) g")
    workdir = make_rig_dir(root, "work-")
    dk = Drkit(cluster, workdir)
    dk.ok("init")
    enable_archiving(cluster, dk)
    cluster.psql("SELECT pg_switch_wal()")
    dk.ok("backup", "--type", "full")
    cluster.psql("UPDATE t SET g = g + 1 WHERE g < 1000")
    dk.ok("backup", "--type", "incr")
    repo = dk.repo_path
    real = sorted(p.name for p in (repo / "backup").iterdir())
    template_key = next((repo / "backup" / real[0] / "key").iterdir()).read_bytes()
    oldest = BackupLabel(real[0]).time
    for i in range(backups - len(real)):
        label = BackupLabel.new(BackupType.FULL, oldest - timedelta(hours=i + 1))
        base = repo / "backup" / str(label)
        (base / "data").mkdir(parents=True)
        (base / "key").mkdir()
        (base / "data" / "000000").write_bytes(os.urandom(1024))
        (base / "key" / "0001.json").write_bytes(template_key)
        (base / "manifest").write_bytes(os.urandom(512))
    wal = repo / "wal" / "00000001"
    have = len(list(wal.iterdir()))
    for segno in range(segments - have):  # segment numbers far below the real ones
        name = f"00000001{segno // 256:08X}{segno % 256:08X}"
        (wal / name).write_bytes(b"\0" * 64)
    chown_to_server_user(repo, recursive=True)
    return dk


def metrics_cost(dk: Drkit, repeat: int) -> tuple[float, float, float, float]:
    """Wall seconds of ``drkit metrics --textfile``: the first run (no sizes known yet: the
    repository is listed with every object's size) and the best of the next ``repeat`` (sizes
    kept from the run before, drkit/schedule/sizes.py); then the same for ``collect()``."""
    out = dk.workdir / "prom"
    out.mkdir(exist_ok=True)
    settings = load_settings(dk.config)
    command: list[float] = []
    for _ in range(repeat + 1):
        start = time.monotonic()
        subprocess.run(
            [*DRKIT, "metrics", "--textfile", str(out / "drkit.prom"), "--config", str(dk.config)],
            check=True,
            capture_output=True,
        )
        command.append(time.monotonic() - start)
    inner: list[float] = []
    for index in range(repeat + 1):
        start = time.monotonic()
        collect(settings, sizes=SizeCache(None) if index == 0 else None)
        inner.append(time.monotonic() - start)
    return command[0], min(command[1:]), inner[0], min(inner[1:])


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_scheduler(dk: Drkit, schedule: dict[str, str]) -> tuple[subprocess.Popen[str], list[str]]:
    dk.write_config(
        archive={"spool_path": dk.workdir / "spool"},
        schedule=schedule,
        metrics={"listen": "127.0.0.1:0"},
    )
    proc = subprocess.Popen(
        [*DRKIT, "schedule", "--config", str(dk.config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 60
    while not any("scheduler started" in line for line in lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"drkit schedule did not start:\n{''.join(lines)}")
        time.sleep(0.05)
    return proc, lines


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def idle_cost(dk: Drkit, seconds: float) -> tuple[float, float]:
    proc, _ = start_scheduler(dk, {"full": "0 3 * * sun", "incr": "15 * * * *"})
    try:
        time.sleep(5)
        cpu0, t0 = proc_cpu(proc.pid), time.monotonic()
        time.sleep(seconds)
        share = (proc_cpu(proc.pid) - cpu0) / (time.monotonic() - t0)
        return share * 100, proc_rss_mib(proc.pid)
    finally:
        stop(proc)


def trigger_latency(dk: Drkit, seconds: float) -> list[float]:
    proc, lines = start_scheduler(dk, {"heartbeat": "* * * * * *"})
    try:
        time.sleep(seconds)
    finally:
        stop(proc)
    delays = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("message") == "job started":
            at = datetime.strptime(record["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
            delays.append(at.microsecond / 1e6)  # due at the whole second
    return delays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backups", type=int, default=1000)
    parser.add_argument("--segments", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--idle-seconds", type=float, default=30)
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()

    root = make_rig_dir(Path(tempfile.gettempdir()), "drkit-bench-schedule-")
    try:
        dk = build(root, args.backups, args.segments)
        cold_s, command_s, cold_collect_s, collect_s = metrics_cost(dk, args.repeat)
        cpu_pct, rss = idle_cost(dk, args.idle_seconds)
        delays = trigger_latency(dk, 15)
        print(f"repository: {args.backups} backups, {args.segments} WAL objects")
        print(
            f"drkit metrics --textfile: {command_s:.2f} s, first run {cold_s:.2f} s"
            f" (collect() alone {collect_s:.2f} s, without known sizes {cold_collect_s:.2f} s)"
        )
        print(f"drkit schedule idle: {cpu_pct:.2f}% of a core, RSS {rss:.0f} MiB")
        if delays:
            median, worst = statistics.median(delays) * 1000, max(delays) * 1000
            runs = len(delays)
            print(f"trigger latency ({runs} runs): median {median:.0f} ms, max {worst:.0f} ms")
    finally:
        stop_clusters_under(root)
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
