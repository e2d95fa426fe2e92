"""Logging: JSON lines on a pipe, human lines on a terminal, levels from the flag and the
environment, a log file opened safely, and no secret in any log."""

from __future__ import annotations

import json
import logging
import os
import pty
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from rig.drkit import DRKIT, Drkit
from rig.postgres import PgCluster

from drkit.logs import add_log_file, event, setup_logging

CONFIG = """
[postgres]
pgdata = "{dir}/pgdata"
[keys]
keyfile = "{dir}/backup.key"
[[repo]]
name = "local"
path = "{dir}/repo"
"""


def config(directory: Path, extra: str = "") -> Path:
    directory.chmod(0o700)
    path = directory / "drkit.toml"
    path.write_text(CONFIG.format(dir=directory) + extra)
    return path


def drkit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess, stderr on a pipe."""
    return subprocess.run(
        [*DRKIT, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def json_lines(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_stderr_not_a_terminal_gets_json_lines(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    dsn = "host=db user=drkit password='s3 cret' dbname=postgres"
    result = drkit(
        "--log-level", "debug", "info", "--config", str(cfg), env={"DRKIT_POSTGRES__DSN": dsn}
    )
    records = json_lines(result.stderr)
    loaded = [r for r in records if r["message"] == "settings loaded"]
    assert len(loaded) == 1, result.stderr
    record = loaded[0]
    assert record["level"] == "debug" and record["logger"] == "drkit.cli.common"
    assert record["config"] == str(cfg)
    assert record["settings"]["repo"][0]["path"] == str(tmp_path / "repo")
    assert record["settings"]["postgres"]["dsn"] == (
        "host=db user=drkit password=********** dbname=postgres"
    )
    assert "s3 cret" not in result.stderr
    assert record["time"].endswith("Z") and record["time"][10] == "T"
    # the error that ends the command stays one human line + HINT, not a log record
    assert "error: " in result.stderr and "HINT:" in result.stderr


def test_stderr_on_a_terminal_gets_human_lines(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.Popen(
            [*DRKIT, "--log-level", "debug", "info", "--config", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=secondary,
        )
        os.close(secondary)
        output = b""
        while True:  # read while it writes: a full terminal buffer would block it
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            output += chunk
        proc.wait(timeout=60)
    finally:
        os.close(primary)
    text = output.decode()
    assert proc.returncode != 0  # the repository is not initialized
    assert "debug\x1b[0m: settings loaded" in text and f"config={cfg}" in text
    assert '{"time"' not in text


def test_level_from_environment_and_flag(tmp_path: Path) -> None:
    cfg = str(config(tmp_path))

    def debug_lines(result: subprocess.CompletedProcess[str]) -> int:
        return sum(r["level"] == "debug" for r in json_lines(result.stderr))

    assert debug_lines(drkit("info", "--config", cfg)) == 0  # default: info
    assert debug_lines(drkit("info", "--config", cfg, env={"DRKIT_LOG_LEVEL": "debug"})) == 1
    flag_wins = drkit(
        "--log-level", "warning", "info", "--config", cfg, env={"DRKIT_LOG_LEVEL": "debug"}
    )
    assert debug_lines(flag_wins) == 0
    bad = drkit("info", "--config", cfg, env={"DRKIT_LOG_LEVEL": "chatty"})
    assert bad.returncode == 3
    assert "unknown log level 'chatty' in --log-level or DRKIT_LOG_LEVEL" in bad.stderr
    assert "HINT: use one of: debug, info, warning, error" in bad.stderr


def test_log_file_is_created_private_and_appended(tmp_path: Path) -> None:
    log_path = tmp_path / "logs" / "drkit.log"
    log_path.parent.mkdir(mode=0o750)
    cfg = str(config(tmp_path, f'[log]\npath = "{log_path}"\nlevel = "debug"\n'))
    drkit("info", "--config", cfg)  # stderr stays at info; the file gets debug
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600
    drkit("info", "--config", cfg)
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [r["message"] for r in records] == ["settings loaded", "settings loaded"]


def test_log_file_through_a_symlink_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("not drkit's\n")
    link = tmp_path / "drkit.log"
    link.symlink_to(target)
    cfg = str(config(tmp_path, f'[log]\npath = "{link}"\n'))
    result = drkit("info", "--config", cfg)
    assert result.returncode == 3
    assert f"refusing log file '{link}': it is a symbolic link" in result.stderr
    assert target.read_text() == "not drkit's\n"


def test_log_file_in_a_directory_everyone_may_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    cfg = str(config(tmp_path, f'[log]\npath = "{shared / "drkit.log"}"\n'))
    result = drkit("info", "--config", cfg)
    assert result.returncode == 3
    assert "its directory is writable by every user" in result.stderr
    assert not (shared / "drkit.log").exists()


def test_log_file_moved_away_by_logrotate_is_reopened(tmp_path: Path) -> None:
    """A long-running process (the heartbeat, the WAL pusher) keeps logging into the file at
    the configured path after logrotate renamed the old one."""
    path = tmp_path / "drkit.log"
    setup_logging("error")
    add_log_file(path, "info")
    log = logging.getLogger("drkit.heartbeat")
    log.info("before rotation")
    path.rename(tmp_path / "drkit.log.1")
    log.info("after rotation")
    setup_logging("error")  # closes the file
    assert json.loads((tmp_path / "drkit.log.1").read_text())["message"] == "before rotation"
    assert json.loads(path.read_text())["message"] == "after rotation"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_structured_events_are_json_fields(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info")
    event(logging.getLogger("drkit.schedule"), "job finished", job="backup", seconds=1.5)
    (record,) = json_lines(capsys.readouterr().err)
    assert record["message"] == "job finished" and record["logger"] == "drkit.schedule"
    assert record["job"] == "backup" and record["seconds"] == 1.5


def test_no_secret_reaches_a_log_at_debug(pg: PgCluster, workdir: Path) -> None:
    """A Vault token in the settings and the key file's content appear neither on stderr nor in
    the log file, with every drkit logger at debug, through a backup and info; the backup's
    notice is a log record."""
    token = "hvs.never-log-this-token-4e1f"
    log_path = workdir / "logs" / "drkit.log"
    log_path.parent.mkdir(mode=0o700)
    dk = Drkit(pg, workdir)
    dk.write_config(log={"path": str(log_path), "level": "debug"})
    with dk.config.open("a") as file:
        file.write(
            f'[keys.vault]\naddr = "http://127.0.0.1:1"\nallow_insecure_http = true\n'
            f'token = "{token}"\n'
        )
    dk.config.chmod(0o600)  # a file holding a token must be private
    dk.ok("init")
    backup = dk.ok("backup", "--type", "incr")  # nothing to base it on: a full, with a notice
    records = json_lines(backup.stderr)
    (notice,) = [r for r in records if r["logger"] == "drkit.backup.operation"]
    assert notice["level"] == "info"
    assert notice["message"] == "no earlier backup to base a incr backup on: taking a full backup"
    # off a terminal, the progress bar is one record at the start and one at the end
    started, ended = [r for r in records if r.get("task", "").startswith("backup ")]
    assert started["message"].endswith(" started") and started["bytes_total"] > 0
    assert ended["message"].endswith(" ended") and ended["bytes"] > 0
    assert ended["seconds"] >= 0
    assert dk.keyfile is not None
    key = dk.keyfile.read_bytes()
    result = drkit("--log-level", "debug", "info", "--json", "--config", str(dk.config))
    assert result.returncode == json.loads(result.stdout)["exit_code"], result.stderr
    assert json.loads(result.stdout)["backups"], result.stdout
    (loaded,) = [r for r in json_lines(result.stderr) if r["message"] == "settings loaded"]
    assert loaded["settings"]["keys"]["vault"]["token"] == "**********"
    assert loaded["settings"]["keys"]["keyfile"] == str(dk.keyfile)
    logged = log_path.read_bytes()
    assert b"settings loaded" in logged
    for text in (result.stderr.encode(), logged):
        assert token.encode() not in text
        assert key not in text and key.hex().encode() not in text
