"""Progress that is right and fits: the bar's total is what the transfer moves (the WAL has
its own, known only at the backup's end), and the bar fits an 80-column terminal."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from rich.console import Console
from rig.drkit import Drkit
from rig.postgres import PgCluster

from drkit.cli.common import RichProgress

MIB = 1024 * 1024


def _ended(stderr: str) -> dict[str, tuple[int, int]]:
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return {
        r["task"]: (r["bytes"], r["bytes_total"])
        for r in records
        if r["message"].endswith(" ended") and "task" in r
    }


def test_each_transfer_ends_at_its_total(pg: PgCluster, workdir: Path) -> None:
    pg.run_bin("pgbench", "-i", "-s", "2", "-q")
    dk = Drkit(pg, workdir)
    dk.ok("init")
    for kind in ("full", "incr"):
        ended = _ended(dk.ok("backup", "--type", kind).stderr)
        (data,) = [task for task in ended if task.startswith("backup ")]
        (wal,) = [task for task in ended if task.startswith("WAL of backup ")]
        done, total = ended[data]
        assert total > 0 and abs(done - total) <= total // 100, (kind, done, total)
        assert ended[wal][0] == ended[wal][1] >= 16 * MIB  # at least one segment
        pg.psql("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 50 = 0")


def test_the_bar_fits_80_columns_and_shows_its_total() -> None:
    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=True, color_system=None)
    bar = RichProgress(console)
    bar.start("backup 20261207-010000F_20261207-020000D_20261207-030000I", 250 * MIB)
    bar.advance(100 * MIB)
    console.print(bar._bar.get_renderable())
    bar.stop()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())  # the live display's cursor moves
    lines = [line for line in text.splitlines() if "backup" in line]
    assert lines, text
    assert all(len(line) <= 80 for line in lines), lines
    assert "backup …20261207-030000I" in lines[-1] and "100.0/250.0 MiB" in lines[-1], lines
