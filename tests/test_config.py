"""Configuration: one precedence order (flags > DRKIT_* env > file > defaults), per-field errors."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from drkit.cli.help import EXAMPLES
from drkit.cli.main import app
from drkit.config.settings import load_settings
from drkit.errors import ConfigError

BASE = """
[postgres]
pgdata = "/srv/pg"
port = 5433
[keys]
keyfile = "/etc/drkit/k"
[[repo]]
name = "local"
path = "/srv/repo"
[backup]
compress_level = 5
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "drkit.toml"
    path.write_text(text)
    return path


def test_precedence_flags_over_env_over_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(tmp_path, BASE)
    settings = load_settings(config)
    assert settings.postgres.port == 5433 and settings.backup.compress_level == 5
    assert settings.backup.start_fast is False  # default

    monkeypatch.setenv("DRKIT_POSTGRES__PORT", "6000")
    monkeypatch.setenv("DRKIT_BACKUP__PROCESS_MAX", "7")
    settings = load_settings(config, {"backup": {"compress_level": 9, "start_fast": None}})
    assert settings.postgres.port == 6000  # env beats file
    assert settings.postgres.pgdata == Path("/srv/pg")  # file values in the same section stay
    assert settings.backup.process_max == 7
    assert settings.backup.compress_level == 9  # flag beats file
    assert settings.backup.start_fast is False  # a flag left unset changes nothing


def test_environment_names_json_values_and_bad_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DRKIT_* names are case-insensitive, ``__`` reaches into sections, a section, list or
    mapping is JSON (a list replaces the file's), and bad JSON is refused with its variable."""
    config = write(tmp_path, BASE)
    signer = "0123456789abcdef0123456789abcdef"
    monkeypatch.setenv("drkit_postgres__Port", "6001")
    monkeypatch.setenv("DRKIT_ARCHIVE__ASYNC", "true")  # a key with an alias
    monkeypatch.setenv("DRKIT_KEYS__ESCROW__SIGNERS", f'["{signer}"]')
    monkeypatch.setenv("DRKIT_REPO", '[{"name": "env", "path": "/srv/env-repo"}]')
    monkeypatch.setenv("DRKIT_LOG_LEVEL", "debug")  # names no setting: not one
    settings = load_settings(config)
    assert settings.postgres.port == 6001 and settings.postgres.pgdata == Path("/srv/pg")
    assert settings.archive.async_ is True
    assert settings.keys.escrow.signers == [signer]
    assert settings.keys.keyfile == Path("/etc/drkit/k")  # the file's keys section stays
    assert [(r.name, str(r.path)) for r in settings.repo] == [("env", "/srv/env-repo")]

    monkeypatch.setenv("DRKIT_REPO", "[{not json")
    with pytest.raises(ConfigError, match="DRKIT_REPO is not valid JSON"):
        load_settings(config)


def test_config_from_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRKIT_CONFIG", str(write(tmp_path, BASE)))
    assert load_settings(None).repo[0].name == "local"


def test_every_invalid_field_is_reported(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        BASE.replace("compress_level = 5", "compress_level = 99\nbogus = 1").replace(
            "port = 5433", 'port = "x"'
        ),
    )
    with pytest.raises(ConfigError) as raised:
        load_settings(config)
    message = str(raised.value)
    assert f"invalid configuration in '{config}'" in message
    assert "backup.compress_level: Input should be less than or equal to 22" in message
    assert "backup.bogus: Extra inputs are not permitted" in message
    assert "postgres.port:" in message


def test_cli_renders_config_errors_with_exit_code_3(tmp_path: Path) -> None:
    config = write(tmp_path, BASE.replace('keyfile = "/etc/drkit/k"', 'provider = "keyfile"'))
    result = CliRunner().invoke(app, ["info", "--config", str(config)])
    assert result.exit_code == 3
    assert "error: invalid configuration" in result.stderr
    assert "provider 'keyfile' needs keys.keyfile" in result.stderr
    assert "HINT: docs/configuration.md" in result.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["info", "--config", str(tmp_path / "nope.toml")])
    assert result.exit_code == 3
    assert "configuration file" in result.stderr and "does not exist" in result.stderr


def test_duplicate_repository_names_are_refused(tmp_path: Path) -> None:
    config = write(tmp_path, BASE + '[[repo]]\nname = "local"\npath = "/other"\n')
    with pytest.raises(ConfigError, match="repository names must be unique"):
        load_settings(config)


def test_version_and_module_entry_point() -> None:
    import subprocess
    import sys

    from drkit import __version__

    result = subprocess.run(
        [sys.executable, "-m", "drkit", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.strip() == f"drkit {__version__}"


def test_console_script_exit_codes_and_output_through_pipes(tmp_path: Path) -> None:
    """The drkit command ends without interpreter teardown (os._exit): its exit codes and
    everything it printed must still reach the caller through pipes."""
    import os
    import subprocess
    import sys

    drkit = Path(sys.executable).parent / "drkit"
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(drkit), *args], capture_output=True, text=True, timeout=60, env=buffered
        )

    helped = run("restore", "--help")  # long output, fully flushed
    assert helped.returncode == 0 and "--target-time" in helped.stdout
    assert helped.stdout.rstrip().endswith(EXAMPLES["restore"][-1])  # nothing cut off
    usage = run("backup", "--type", "bogus")
    assert usage.returncode == 2 and "'bogus' is not one of" in usage.stderr
    missing = run("info", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 3 and "does not exist" in missing.stderr
    assert run("--version").stdout.startswith("drkit ")


def test_the_retention_window_is_written_as_any_duration(tmp_path: Path) -> None:
    written = {
        '"30d"': timedelta(days=30),
        '"12h"': timedelta(hours=12),
        '"4w"': timedelta(weeks=4),
        '" 1.5d "': timedelta(hours=36),
        '"90m"': timedelta(minutes=90),
        "86400": timedelta(days=1),
    }
    for value, window in written.items():
        config = write(tmp_path, BASE + f"[retention]\nwindow = {value}\n")
        assert load_settings(config).retention.window == window, value
    refused = {
        '"a month"': "retention.window: Value error, 'a month' is not a duration such as '90s'",
        '"1y"': "retention.window: Value error, '1y' is not a duration",
        "-5": "retention.window: Value error, -5 is negative",
        '"0d"': "window must be longer than zero",
    }
    for value, error in refused.items():
        config = write(tmp_path, BASE + f"[retention]\nwindow = {value}\n")
        with pytest.raises(ConfigError) as raised:
            load_settings(config)
        assert error in str(raised.value), value
