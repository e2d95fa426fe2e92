"""Drills against real PostgreSQL: a long sandbox path, a random restore time, the pgbench check."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from test_drill import drill_setup, postgres_under, run_drill


def short_socket_dirs() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("drkit-pg-")}


def test_a_long_sandbox_path_still_starts_the_copy(pg_factory: Any, workdir: Path) -> None:
    parent = workdir / ("sandbox-" + "x" * 50) / ("drills-" + "y" * 40)
    sandbox_root = parent / "drill-20261207-154500Z-abcd" / "run"
    assert len(str(sandbox_root / ".s.PGSQL.54321")) > 150  # beyond a unix socket's 107 bytes
    dk = drill_setup(pg_factory(15), workdir, sandbox=parent)
    before = short_socket_dirs()

    code, out, _ = run_drill(dk)

    record = out["record"]
    assert code == 0, record["reason"]
    assert record["outcome"] == "PASS" and record["wal_segments"] >= 1
    assert {c["name"]: c["ok"] for c in record["checks"]} == {"amcheck": True}
    # Sandbox and the short socket directory are gone, and no server is left
    assert list(parent.iterdir()) == []
    assert short_socket_dirs() <= before
    assert postgres_under(parent) == []
