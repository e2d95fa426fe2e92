"""The drill's checks of the restored copy: is what came up whole, and is it what we expect?

Each check returns a ``CheckResult`` (name, kind, ok, seconds, detail). A check that errors —
a query that fails, a database that is missing, a binary that crashes — is a failed check with
the error as its detail, never an exception: the drill goes on with the next check and records
them all.

- ``amcheck``: heap and b-tree verification, with ``pg_amcheck`` of the copy's major version when
  it is installed (``--install-missing``), else with the amcheck extension over SQL
  (``verify_heapam`` per table on 14+, ``bt_index_check`` per index).
- ``sql``: a query whose first column of the first row, in PostgreSQL's text form, equals
  ``expect``, or as a number lies within ``min``/``max``; with ``max_ms`` it is timed too (best
  of ``repeat`` runs), the "is it fast enough to run the business on" check.
- ``heartbeat``: the heartbeat row (``drkit heartbeat``) no older than the RPO target at the
  disaster instant.
- ``readable``: every table of every database read once (a count per table).
- ``pgbench``: a short read-only ``pgbench`` run (``-S``, or the configured script) of the copy's
  major version; transactions per second below the configured floor FAIL. The session is
  read-only (``default_transaction_read_only``), so the check cannot change the copy it judges.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path

import psycopg

from drkit.config.drill import Checks, PgbenchCheck, SqlCheck
from drkit.config.durations import format_duration
from drkit.pg.cluster import Cluster
from drkit.repo.drills import CheckResult

AMCHECK_TIMEOUT = 6 * 3600  # seconds; pg_amcheck of a large cluster takes long, never forever
_OUTPUT_LINES = 5  # lines of a failing pg_amcheck's output kept in the record
_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)

_DATABASES = "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1"
_TABLES = """
SELECT format('%I.%I', n.nspname, c.relname)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'm') AND c.relpersistence = 'p'
  AND (c.relkind = 'r' OR c.relispopulated)
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
ORDER BY 1
"""
_HEAP_CHECK = """
SELECT c.oid::regclass::text, v.blkno, v.msg
FROM pg_class c, LATERAL verify_heapam(c.oid) v
WHERE c.relkind IN ('r', 'm', 't') AND c.relpersistence = 'p'
LIMIT 5
"""
_BTREE_CHECK = """
SELECT count(bt_index_check(c.oid, %s))
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam
WHERE a.amname = 'btree' AND c.relpersistence = 'p' AND i.indisready AND i.indisvalid
"""


def run_checks(
    cluster: Cluster,
    checks: Checks,
    *,
    heartbeat_at: datetime | None,
    disaster_time: datetime,
    rpo_target: timedelta | None,
) -> list[CheckResult]:
    """Every configured check of the running ``cluster``, in a fixed order."""
    results = []
    if checks.amcheck:
        results.append(_timed("amcheck", "amcheck", lambda: _amcheck(cluster, checks)))
    for check in checks.sql:
        results.append(_timed(check.name, "sql", partial(_sql, cluster, check)))
    if checks.heartbeat and heartbeat_at is not None:
        results.append(
            _timed(
                "heartbeat",
                "heartbeat",
                lambda: _heartbeat(heartbeat_at, disaster_time, rpo_target),
            )
        )
    if checks.readable:
        results.append(_timed("readable", "readable", lambda: _readable(cluster)))
    if checks.pgbench is not None:
        bench = checks.pgbench
        results.append(_measured("pgbench", "pgbench", lambda: _pgbench(cluster, bench)))
    return results


def _timed(name: str, kind: str, check: Callable[[], tuple[bool, str]]) -> CheckResult:
    return _measured(name, kind, lambda: (*check(), None))


def _measured(
    name: str, kind: str, check: Callable[[], tuple[bool, str, float | None]]
) -> CheckResult:
    """Run ``check`` (ok, detail, the figure measured) on the clock; an error is a FAIL."""
    started = time.monotonic()
    value = None
    try:
        ok, detail, value = check()
    except (psycopg.Error, OSError, ValueError, subprocess.SubprocessError) as exc:
        ok, detail = False, f"error: {_one_line(str(exc))}"
    return CheckResult(
        name=name,
        kind=kind,
        ok=ok,
        seconds=round(time.monotonic() - started, 3),
        detail=detail,
        value=value,
    )


# -- amcheck -------------------------------------------------------------------------------------


def _amcheck(cluster: Cluster, checks: Checks) -> tuple[bool, str]:
    binary = cluster.bindir / "pg_amcheck"
    if binary.is_file():
        return _pg_amcheck(binary, cluster, checks)
    return _sql_amcheck(cluster, checks)


def _pg_amcheck(binary: Path, cluster: Cluster, checks: Checks) -> tuple[bool, str]:
    args = ["--no-password", "--install-missing"]
    if checks.heapallindexed:
        args.append("--heapallindexed")
    if checks.amcheck_databases:
        for database in checks.amcheck_databases:
            args += ["--database", database]
    else:
        args.append("--all")
    done = _run_client(binary, cluster, args, timeout=AMCHECK_TIMEOUT)
    what = ", ".join(checks.amcheck_databases) or "every database"
    if done.returncode == 0:
        return True, f"pg_amcheck: heap and b-tree indexes of {what} intact"
    lines = (done.stdout + done.stderr).strip().splitlines()[:_OUTPUT_LINES]
    return False, f"pg_amcheck exit {done.returncode}: " + " | ".join(lines)


def _sql_amcheck(cluster: Cluster, checks: Checks) -> tuple[bool, str]:
    databases = checks.amcheck_databases or _databases(cluster)
    indexes = 0
    for database in databases:
        with cluster.connect(database) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
            if conn.info.server_version >= 140000:
                problems = conn.execute(_HEAP_CHECK).fetchall()
                if problems:
                    found = "; ".join(f"{rel} block {blk}: {msg}" for rel, blk, msg in problems)
                    return False, f"amcheck: database '{database}': {found}"
            row = conn.execute(_BTREE_CHECK, (checks.heapallindexed,)).fetchone()
            indexes += int(row[0]) if row else 0
    return True, f"amcheck (SQL): {len(databases)} databases, {indexes} b-tree indexes intact"


# -- SQL checks ----------------------------------------------------------------------------------


def _sql(cluster: Cluster, check: SqlCheck) -> tuple[bool, str]:
    best: float | None = None
    value: str | None = None
    with cluster.connect(check.database) as conn:
        for _ in range(check.repeat if check.max_ms is not None else 1):
            started = time.monotonic()
            with conn.cursor() as cur:
                cur.execute(check.query.encode())
                result = cur.pgresult
                ms = (time.monotonic() - started) * 1000
                if result is None or result.ntuples == 0 or result.nfields == 0:
                    value = None
                else:
                    raw = result.get_value(0, 0)
                    value = None if raw is None else raw.decode("utf-8", "replace")
            best = ms if best is None else min(best, ms)
    shown = "NULL" if value is None else repr(value)
    failures = []
    if check.expect is not None and value != check.expect:
        failures.append(f"expected {check.expect!r}")
    if check.min is not None or check.max is not None:
        number = _number(value)
        if number is None:
            failures.append("not a number")
        else:
            if check.min is not None and number < check.min:
                failures.append(f"below the minimum {check.min:g}")
            if check.max is not None and number > check.max:
                failures.append(f"above the maximum {check.max:g}")
    detail = f"got {shown}"
    if check.max_ms is not None and best is not None:
        detail += f" in {best:.1f} ms"
        if best > check.max_ms:
            failures.append(f"slower than {check.max_ms:g} ms")
    if failures:
        return False, f"{detail}: {', '.join(failures)}"
    return True, detail


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


# -- pgbench -------------------------------------------------------------------------------------


def _pgbench(cluster: Cluster, check: PgbenchCheck) -> tuple[bool, str, float | None]:
    binary = cluster.bindir / "pgbench"
    if not binary.is_file():
        return False, f"no pgbench beside the server binaries in '{cluster.bindir}'", None
    args = [
        "--no-vacuum",
        "--client",
        str(check.clients),
        "--jobs",
        str(min(check.clients, os.cpu_count() or 1)),
        "--time",
        str(check.seconds),
    ]
    args += ["--file", str(check.script)] if check.script else ["--select-only"]
    args.append(check.database)
    done = _run_client(
        binary,
        cluster,
        args,
        timeout=check.seconds + 120,
        options="-c default_transaction_read_only=on",
    )
    what = f"pgbench {'-f ' + check.script.name if check.script else '-S'}"
    what += f", {check.clients} clients, {check.seconds}s"
    found = _TPS.search(done.stdout)
    if done.returncode != 0 or found is None:
        lines = (done.stderr + done.stdout).strip().splitlines()
        problems = [line for line in lines if "error" in line.lower()] or lines
        return (
            False,
            f"{what}: exit {done.returncode}: " + " | ".join(problems[:_OUTPUT_LINES]),
            None,
        )
    tps = float(found.group(1))
    detail = f"{what}: {tps:.0f} tps (floor {check.min_tps:g})"
    if tps < check.min_tps:
        return False, f"{detail}: below the floor", tps
    return True, detail, tps


def _run_client(
    binary: Path, cluster: Cluster, args: list[str], *, timeout: float, options: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL client program (by absolute path, no shell) against the copy: its
    socket, port and user, ``args`` after them, none of the caller's PG* variables (they could
    point it elsewhere) but ``options`` as PGOPTIONS; its output captured."""
    command = [
        str(binary),
        "--host",
        str(cluster.host),
        "--port",
        str(cluster.port),
        "--username",
        cluster.dbuser,
        *args,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if options is not None:
        env["PGOPTIONS"] = options
    return subprocess.run(  # noqa: S603 - fixed argv, no shell
        command, capture_output=True, text=True, env=env, timeout=timeout, cwd="/"
    )


# -- heartbeat and readable ----------------------------------------------------------------------


def _heartbeat(
    at: datetime, disaster_time: datetime, rpo_target: timedelta | None
) -> tuple[bool, str]:
    age = disaster_time - at
    detail = f"newest heartbeat {at.isoformat(timespec='seconds')}, {format_duration(age)} old"
    if rpo_target is None:
        return True, detail
    detail += f" (RPO target {format_duration(rpo_target)})"
    return age <= rpo_target, detail


def _readable(cluster: Cluster) -> tuple[bool, str]:
    tables = rows = 0
    for database in _databases(cluster):
        with cluster.connect(database) as conn:
            for (table,) in conn.execute(_TABLES).fetchall():
                count = conn.execute(f"SELECT count(*) FROM {table}".encode()).fetchone()  # noqa: S608 - name quoted by format('%I.%I') in _TABLES
                tables += 1
                rows += int(count[0]) if count else 0
    return True, f"{tables} tables read, {rows} rows"


def _databases(cluster: Cluster) -> list[str]:
    with cluster.connect() as conn:
        return [str(row[0]) for row in conn.execute(_DATABASES).fetchall()]


def _one_line(text: str) -> str:
    return " ".join(text.split())
