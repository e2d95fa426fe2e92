"""drkit heartbeat against a real server: the row it keeps, surviving a restart, stopping."""

from __future__ import annotations

import json
import signal
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

from rig.drkit import Drkit
from rig.postgres import PgCluster


def heartbeat_row(pg: PgCluster, database: str, table: str) -> tuple[str, str, str]:
    out = pg.psql(
        f"SELECT id, extract(epoch FROM at), host FROM public.{table}", dbname=database
    ).split("|")
    return out[0], out[1], out[2]


def wait_for(condition, what: str, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_once_creates_the_table_and_writes_one_row(pg: PgCluster, workdir: Path) -> None:
    pg.psql("CREATE DATABASE app")
    dk = Drkit(pg, workdir)
    dk.write_config(heartbeat={"database": "app", "table": "dr_heartbeat"})
    before = datetime.now(UTC).timestamp()

    result = json.loads(dk.ok("heartbeat", "--once", "--json").stdout)
    again = json.loads(dk.ok("heartbeat", "--once", "--json").stdout)

    assert result["beats"] == 1 and result["table"] == "public.dr_heartbeat"
    assert pg.psql("SELECT count(*) FROM public.dr_heartbeat", dbname="app") == "1"
    row_id, at, host = heartbeat_row(pg, "app", "dr_heartbeat")
    assert (row_id, host) == ("1", socket.gethostname())
    assert float(at) == datetime.fromisoformat(again["last_at"]).timestamp()
    assert before - 1 < float(at) < datetime.now(UTC).timestamp() + 1
    columns = pg.psql(
        "SELECT string_agg(column_name || ' ' || data_type, ', ' ORDER BY ordinal_position)"
        " FROM information_schema.columns WHERE table_name = 'dr_heartbeat'",
        dbname="app",
    )
    assert columns == "id integer, at timestamp with time zone, host text"


def test_once_fails_clearly_when_the_server_is_down(pg: PgCluster, workdir: Path) -> None:
    dk = Drkit(pg, workdir)
    pg.stop()
    result = dk.run("heartbeat", "--once")
    assert result.exit_code == 4, result.output
    assert "unable to connect to database 'postgres'" in result.stderr
    assert "HINT:" in result.stderr


def test_bad_interval_is_refused(pg: PgCluster, workdir: Path) -> None:
    result = Drkit(pg, workdir).run("heartbeat", "--interval", "often")
    assert result.exit_code == 2
    assert "'often' is not a duration" in result.output


def test_running_heartbeat_survives_a_restart_and_stops_on_sigterm(
    pg: PgCluster, workdir: Path
) -> None:
    dk = Drkit(pg, workdir)
    proc = dk.spawn("heartbeat", "--interval", "0.2s", "--json")
    try:

        def at() -> float:
            try:
                return float(heartbeat_row(pg, "postgres", "drkit_heartbeat")[1])
            except Exception:
                return 0.0

        wait_for(lambda: at() > 0, "the first beat")
        first = at()
        wait_for(lambda: at() > first, "a second beat")

        pg.stop()  # the heartbeat logs its failures and keeps trying
        down = datetime.now(UTC).timestamp()
        pg.start()
        wait_for(lambda: at() > down, "a beat after the restart")
        assert proc.poll() is None

        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=5)
        elapsed = time.monotonic() - sent
        stdout, stderr = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert elapsed < 1.0
    result = json.loads(stdout)
    assert result["stopped_by"] == "SIGTERM"
    assert result["beats"] >= 3 and result["failures"] >= 1
    logged = [json.loads(line) for line in stderr.splitlines()]
    assert logged[0]["message"] == "heartbeat started"
    assert logged[0]["interval_seconds"] == 0.2
    failures = [r for r in logged if r["message"] == "heartbeat failed"]
    assert failures and all(r["level"] == "warning" for r in failures)
    assert any("unable to" in r["error"] for r in failures)
    assert logged[-1]["message"] == "heartbeat written"  # after the restart
