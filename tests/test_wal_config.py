"""The WAL commands' fast configuration loader agrees with the full one (load_settings), and
defers to it for everything it does not handle."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from drkit.config.settings import ArchiveSettings, load_settings
from drkit.crypto.keyfile import create_keyfile
from drkit.errors import ConfigError
from drkit.repo.repository import FORMAT_KEY as REPOSITORY_FORMAT_KEY
from drkit.wal.config import ArchiveConfig, WalConfig, load_wal_config
from drkit.wal.fetch import FORMAT_KEY

Writer = Callable[..., Path]


@pytest.fixture
def write(tmp_path: Path) -> Writer:
    keyfile = tmp_path / "k"
    create_keyfile(keyfile)
    base = (
        f'lock_path = "{tmp_path / "locks"}"\n'
        f'[postgres]\npgdata = "{tmp_path / "pgdata"}"\nport = 5433\n'
        f'[keys]\nkeyfile = "{keyfile}"\n'
        f'[[repo]]\nname = "main"\npath = "{tmp_path / "repo"}"\n'
        f'[[repo]]\nname = "offsite"\ntype = "s3"\nbucket = "drkit-offsite"\noffsite = true\n'
    )

    def write(extra: str = "") -> Path:
        path = tmp_path / "drkit.toml"
        path.write_text(base + extra)
        return path

    return write


def comparable(config: WalConfig) -> dict[str, object]:
    return {
        "config_path": config.config_path,
        "pgdata": config.pgdata,
        "lock_path": config.lock_path,
        "archive": config.archive._asdict(),
        "repo_name": config.repo_name,
        "spool_path": config.spool_path,
    }


@pytest.mark.parametrize(
    "extra",
    [
        "",
        "[archive]\nasync = true\nprocess_max = 3\n",
        '[archive]\nspool_path = "/var/spool/drkit"\ncompress_level = -3\nkey_period = "hourly"'
        "\npush_timeout = 2.5\n",
        "[archive]\npush_timeout = 7\n[backup]\ncompress_level = 6\n",
        "[archive]\nfetch_ahead = 0\n",
        "[archive]\nfetch_ahead = 32\nprocess_max = 2\n",
    ],
)
def test_fast_path_reads_what_load_settings_reads(write: Writer, extra: str) -> None:
    path = write(extra)
    fast = load_wal_config(path)
    full = load_wal_config(path, fast=False)
    assert fast.fast and not full.fast
    assert comparable(fast) == comparable(full)
    assert fast.open_repository().name == full.open_repository().name == "main"


def test_defaults_agree() -> None:
    settings = ArchiveSettings.model_validate({})
    assert ArchiveConfig()._asdict() == {
        "async_": settings.async_,
        "spool_path": settings.spool_path,
        "process_max": settings.process_max,
        "compress_level": settings.compress_level,
        "key_period": settings.key_period,
        "push_timeout": settings.push_timeout,
        "fetch_ahead": settings.fetch_ahead,
    }


def test_environment_overrides_take_the_full_path(
    write: Writer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DRKIT_ARCHIVE__ASYNC", "true")
    config = load_wal_config(write())
    assert not config.fast and config.archive.async_


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ("[archive]\nprocess_max = 0\n", "archive.process_max"),
        ('[archive]\nasync = "maybe"\n', "archive.async"),
        ('[archive]\nkey_period = "weekly"\n', "archive.key_period"),
        ("[archive]\nspeed = 3\n", "archive.speed"),
    ],
)
def test_invalid_settings_are_explained_by_the_full_loader(
    write: Writer, extra: str, field: str
) -> None:
    path = write(extra)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    with pytest.raises(ConfigError) as wal_caught:
        load_wal_config(path)
    assert field in str(caught.value) and str(wal_caught.value) == str(caught.value)


def test_a_missing_configuration_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_wal_config(tmp_path / "nope.toml")


def test_lazy_loading_reads_the_spool_settings_and_defers_the_rest(write: Writer) -> None:
    """wal-fetch --prefetch takes most segments from the spool: it reads the paths and
    [archive] like the fast path, whatever the repositories, and the full settings only when it
    opens a repository."""
    path = write('[archive]\nfetch_ahead = 3\nspool_path = "/var/spool/drkit"\n')
    lazy = load_wal_config(path, repos=["offsite"], lazy=True)
    full = load_wal_config(path, repos=["offsite"])
    assert comparable(lazy) == comparable(full)
    assert lazy.archive.fetch_ahead == 3
    assert lazy.open_repository().name == "offsite"
    probe = (
        "import sys; from pathlib import Path; from drkit.wal.config import load_wal_config;"
        f" load_wal_config(Path({str(path)!r}), repos=['offsite'], lazy=True);"
        " print('pydantic' in sys.modules)"
    )
    imported = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert imported.stdout.strip() == "False"


def test_lazy_loading_leaves_invalid_settings_to_the_full_loader(write: Writer) -> None:
    path = write("[archive]\nfetch_ahead = 65\n")
    with pytest.raises(ConfigError) as caught:
        load_wal_config(path, lazy=True)
    assert "archive.fetch_ahead" in str(caught.value)


def test_fetching_from_a_single_local_repository_never_loads_the_full_settings(
    tmp_path: Path,
) -> None:
    """A direct fetch, and a file that is not archived (the history files every recovery asks
    for, the end of the archive), cost recovery the start-up of wal-fetch: with one local
    repository and a key file, pydantic is never imported."""
    keyfile = tmp_path / "k"
    create_keyfile(keyfile)
    path = tmp_path / "drkit.toml"
    path.write_text(
        f'[postgres]\npgdata = "{tmp_path / "pgdata"}"\n[keys]\nkeyfile = "{keyfile}"\n'
        f'[[repo]]\nname = "main"\npath = "{tmp_path / "repo"}"\n'
    )
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / FORMAT_KEY).write_text("{}")  # a repository is there
    probe = (
        "import sys; from pathlib import Path; from drkit.wal.config import load_wal_config;"
        " from drkit.wal.operation import WalSources, WalFetchRequest, fetch_from;"
        f" config = load_wal_config(Path({str(path)!r}), lazy=True, one_shot=True);"
        " sources = WalSources(config);"
        f" request = WalFetchRequest('00000002.history', Path({str(tmp_path / 'h')!r}));"
        " print(fetch_from(sources, request).fetched, sources.secondaries(),"
        " 'pydantic' in sys.modules, 'cryptography' in sys.modules)"
    )
    imported = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert imported.stdout.split() == ["False", "[]", "False", "False"]  # not archived
    assert FORMAT_KEY == REPOSITORY_FORMAT_KEY
