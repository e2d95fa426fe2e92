"""info for monitoring: a status line, an exit code that means something (a single repository is
a choice, no retention is a warning), and a backup running on this host. Real PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rig.drkit import Drkit
from rig.postgres import PgCluster

from drkit.errors import NoRetention, Rule321Failed


def test_info_status_and_exit_codes(pg: PgCluster, workdir: Path) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    dk.ok("backup")

    # One repository, no retention: the one warning is the missing retention
    result = dk.run("info")
    assert result.exit_code == NoRetention.exit_code == 111, result.output
    assert (
        "status: warning: no retention is configured for repository 'local': 'drkit prune'"
        " keeps every backup" in result.stdout
    )
    assert "3-2-1 FAIL (not required)" in result.stdout
    data = dk.info()
    assert [w["warning"] for w in data["warnings"]] == ["NoRetention"]
    assert data["require_321"] is False and data["running"] is None

    # With a retention: ok, exit 0
    dk.write_config(retention={"full": 2})
    result = dk.run("info")
    assert result.exit_code == 0, result.output
    assert "status: ok" in result.stdout
    assert dk.info()["status"] == "ok"

    # 3-2-1 asked for explicitly: a single repository fails it
    dk.write_config(retention={"full": 2}, copies={"require_321": True})
    result = dk.run("info")
    assert result.exit_code == Rule321Failed.exit_code, result.output
    assert "status: warning: the newest backup does not meet 3-2-1" in result.stdout


def test_info_shows_a_running_backup(pg: PgCluster, workdir: Path) -> None:
    dk = Drkit(pg, workdir)
    dk.write_config(retention={"full": 2})
    dk.ok("init")
    lock_dir, scope = str(workdir / "locks"), f"posix:{dk.repo_path}"
    holder = subprocess.Popen(  # holds the lock as a running backup does
        [
            sys.executable,
            "-c",
            "import time\n"
            "from pathlib import Path\n"
            "from drkit.repo.lock import operation_lock\n"
            f"with operation_lock(Path({lock_dir!r}), {scope!r}, 'backup'):\n"
            "    print('locked', flush=True)\n"
            "    time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    # What the running backup has stored so far: its label has objects, not yet a manifest
    label = "20991231-235959F"
    data = dk.repo_path / "backup" / label / "data"
    data.mkdir(parents=True)
    (data / "000000").write_bytes(b"x" * 2048)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        result = dk.run("info")
        assert result.exit_code == 0, result.output  # not a leftover while it runs
        assert "status: ok (backup running)" in result.stdout
        assert "backup running since 20" in result.stdout
        assert f"(pid {holder.pid}): {label}, 2.0 KiB stored so far" in result.stdout
        info = json.loads(dk.run("info", "--json").stdout)
        assert info["running"]["pid"] == holder.pid and info["running"]["label"] == label
        assert info["running"]["stored"] == 2048 and info["incomplete"] == []
    finally:
        holder.kill()
        holder.wait()
    # Killed: no longer running, and what it stored is a leftover the next backup removes
    info = json.loads(dk.run("info", "--json").stdout)
    assert info["running"] is None and info["incomplete"] == [label]
    assert [w["warning"] for w in info["warnings"]] == ["IncompleteBackup"]
