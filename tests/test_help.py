"""What drkit prints for people to copy works when copied: --help, the examples in it, the
version init reports, the archive_command it suggests and the start command restore prints."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import typer
from rig.drkit import Drkit
from rig.postgres import PgCluster
from typer.testing import CliRunner

from drkit.cli.help import EXAMPLES
from drkit.cli.main import app

DRKIT = Path(sys.executable).parent / "drkit"


def _commands() -> list[tuple[str, object]]:
    """Every visible command and sub-command, by path ('keys rotate')."""
    found: list[tuple[str, object]] = []

    def walk(command: object, path: str) -> None:
        if path:
            found.append((path, command))
        for name, sub in getattr(command, "commands", {}).items():
            if not getattr(sub, "hidden", False):
                walk(sub, f"{path} {name}".strip())

    walk(typer.main.get_command(app), "")
    return found


@pytest.mark.parametrize("path", [path for path, _ in _commands()])
def test_help_names_values_and_shows_examples_that_parse(path: str) -> None:
    result = CliRunner().invoke(app, [*path.split(), "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    text = result.stdout
    typer_types = r"<(bool|str|int|float|path|list\[.*?\]|\w+ range|%.*?|[\w|]+\|[\w|]+)>"
    assert not re.search(typer_types, text), text  # no <bool>, <str>, <list[str]>, <a|b>
    assert "╭" not in text and "│" not in text  # no box frame in what is copied
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "Examples:" in text
    command = dict(_commands())[path]
    for example in EXAMPLES[path]:
        assert example in text
        words = shlex.split(example)
        assert words[: 1 + len(path.split())] == ["drkit", *path.split()], example
        # click parses the example's arguments exactly as when it is run
        command.make_context(path, words[1 + len(path.split()) :])  # type: ignore[attr-defined]


def test_root_help_lists_the_exit_codes_and_usage_errors_exit_2() -> None:
    helped = subprocess.run([str(DRKIT), "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0
    assert "Exit codes: 0 ok; 1 warnings of several kinds; 2 a usage error" in helped.stdout
    assert "--log-level debug|info|warning|error" in helped.stdout
    assert "<str>" not in helped.stdout and "<bool>" not in helped.stdout
    usage = subprocess.run(
        [str(DRKIT), "restore", "--archive-mode", "sometimes"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert usage.returncode == 2, usage.stderr
    assert "Usage: drkit restore [OPTIONS]" in usage.stderr and "'sometimes'" in usage.stderr


def test_init_names_the_version_and_an_archive_command_that_runs(
    pg: PgCluster, workdir: Path
) -> None:
    dk = Drkit(pg, workdir)
    result = dk.ok("init")
    version = pg.psql("SHOW server_version").split()[0]
    assert f"ok: PostgreSQL {version}, system " in result.stdout  # e.g. 15.20, not 150020
    assert "ok: max_replication_slots = 4" in result.stdout
    (suggested,) = re.findall(r"archive_command = '([^']+)'", result.stdout)
    assert suggested == f"{DRKIT} wal-push --config {dk.config} %p"


def test_the_printed_start_command_starts_the_copy_beside_its_source(
    pg: PgCluster, workdir: Path
) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    dk.ok("backup")
    target = workdir / "copy"
    result = dk.ok("restore", "--pgdata", str(target))
    lines = result.stdout.splitlines()
    assert (
        lines[-2] == "next: start the restored cluster (it replays the backup's WAL, then opens):"
    )
    start = lines[-1].strip()
    log = target.parent / "copy.log"  # outside PGDATA: a backup of the copy does not take it
    assert f" -l {log} " in start
    port = int(re.findall(r"-o '-p (\d+)'", start)[0])
    assert port != pg.port

    # Run it as printed, while the source keeps running on its own port
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    subprocess.run(start, shell=True, check=True, timeout=120, env=env)  # noqa: S602
    try:
        socket_dir = (target / "postmaster.pid").read_text().splitlines()[4]
        with psycopg.connect(host=socket_dir, port=port, user="postgres", dbname="postgres") as c:
            assert c.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
        assert log.is_file() and pg.psql("SELECT 1") == "1"
    finally:
        stop = start.replace(" start", " stop -m immediate").replace(f" -l {log} ", " ")
        subprocess.run(stop, shell=True, timeout=120)  # noqa: S602


def test_a_command_loads_only_itself_and_helps_as_in_the_whole_app() -> None:
    """Start-up is part of a restore's RTO: ``drkit restore`` imports no other command's module,
    and no rich for a --help; the help it prints is the one the whole app gives (an option
    before the command gets the whole app)."""
    for path in ("restore", "drill note", "keys rotate"):
        args = [*path.split(), "--help"]
        env = {**os.environ, "COLUMNS": "80", "PYTHONVERBOSE": "1"}  # a line per module loaded
        proc = subprocess.run([DRKIT, *args], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        whole = subprocess.run(
            [DRKIT, "--log-level", "info", *args], capture_output=True, text=True, env=env
        )
        assert whole.returncode == 0, whole.stderr
        assert proc.stdout == whole.stdout
        assert "import 'drkit.cli.backup'" in whole.stderr  # the whole app it was compared with
        modules = set(re.findall(r"^import '([\w.]+)'", proc.stderr, re.MULTILINE))
        command = f"drkit.cli.{path.split()[0]}"
        assert command in modules
        shared = {"drkit.cli.main", "drkit.cli.common", "drkit.cli.help"}
        others = {  # drill's own modules are drkit.cli.drill*
            m for m in modules if m.startswith("drkit.cli.") and not m.startswith(command)
        } - shared
        assert not others, f"drkit {path} imports {sorted(others)}"
        assert not {m for m in modules if m.split(".")[0] == "rich"}
