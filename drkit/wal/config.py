"""The configuration of the WAL commands, loaded without pydantic when it can be.

wal-push runs once per WAL segment, so its start-up time is on the database's critical path, and
pydantic with the settings' models takes ~0.1 s to import. The common case — a posix repository,
the keyfile provider, no ``DRKIT_*`` overrides in the environment — is therefore read here with
``tomllib``. Everything else (other storage or key providers, environment overrides, anything
unexpected or invalid in the sections read here) goes through the full loader, ``load_settings``,
which is the reference: the fast path accepts only what it would accept and gives the same values
(tests/test_wal_config.py compares them). Sections and repositories the WAL commands do not use
(backup settings, secondary repositories) are not validated on the fast path; every other command
validates them.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from drkit.errors import ConfigError
from drkit.private_dir import default_lock_path
from drkit.repo.wal_names import KeyPeriod

if TYPE_CHECKING:
    from drkit.config.settings import Settings
    from drkit.crypto.base import KeyProvider
    from drkit.repo.wal_objects import RepoLike
    from drkit.storage.base import Storage

DEFAULT_CONFIG = Path("/etc/drkit/drkit.toml")  # as drkit.config.settings
_REPO_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_POSTGRES_KEYS = {"pgdata", "dsn", "host", "port", "user", "dbname"}
_REPO_KEYS = {"name", "type", "path", "media", "offsite"}
_ARCHIVE_KEYS = {
    "async",
    "spool_path",
    "process_max",
    "compress_level",
    "key_period",
    "push_timeout",
    "fetch_ahead",
}


class ArchiveConfig(NamedTuple):
    async_: bool = False
    spool_path: Path | None = None
    process_max: int = min(4, os.cpu_count() or 1)
    compress_level: int = 1
    key_period: KeyPeriod = "daily"
    push_timeout: float = 60.0
    fetch_ahead: int = 8


class WalRepository:
    """A repository as the WAL code needs it: storage now, the key provider when first used (so
    that asking for a WAL file that is not archived never contacts the key provider)."""

    def __init__(self, storage: Storage, keys: Callable[[], KeyProvider]) -> None:
        self.storage = storage
        self._make_keys = keys
        self._keys: KeyProvider | None = None

    @property
    def name(self) -> str:
        return self.storage.name

    @property
    def keys(self) -> KeyProvider:
        if self._keys is None:
            self._keys = self._make_keys()
        return self._keys


class WalConfig(NamedTuple):
    config_path: Path
    pgdata: Path
    lock_path: Path
    archive: ArchiveConfig
    repo_name: str
    fast: bool  # loaded without pydantic
    opener: Callable[[], RepoLike]  # use open_repository()
    fallbacks: bool = True  # other repositories to fetch from (secondary_repositories)

    def open_repository(self) -> RepoLike:
        """The primary repository (the first configured one), where WAL is pushed."""
        return self.opener()

    @property
    def spool_path(self) -> Path:
        """Where the async mode keeps its status files: one directory per cluster."""
        if self.archive.spool_path is not None:
            return self.archive.spool_path
        import hashlib

        digest = hashlib.sha256(str(self.pgdata.absolute()).encode()).hexdigest()[:12]
        return self.lock_path / f"spool-{digest}"


def config_file(config: Path | None) -> Path:
    path = config or Path(os.environ.get("DRKIT_CONFIG", DEFAULT_CONFIG))
    if not path.is_file():
        raise ConfigError(
            f"configuration file '{path}' does not exist",
            hint="pass --config PATH or set DRKIT_CONFIG; docs/configuration.md has an example",
        )
    return path


def load_wal_config(
    config: Path | None,
    *,
    fast: bool = True,
    recovery_key: Path | None = None,
    one_shot: bool = False,
    repos: list[str] | None = None,
    lazy: bool = False,
) -> WalConfig:
    """The WAL commands' configuration; with ``recovery_key``, keys come from the escrow
    recovery key (never from Vault), through the full loader. ``one_shot``: the process makes
    one key request and exits (a synchronous wal-push, a wal-fetch), so a Vault session skips
    the token lookup and renewal that a long-running pusher needs. ``repos``: only these
    repositories, in this order (wal-fetch --repo: a drill reading only the copies its scenario
    leaves); the first is then the primary. ``lazy`` (wal-fetch --prefetch, whose requests
    mostly take a segment the background fetcher already fetched): what the fast path handles
    as it does, anything else with only the paths and ``[archive]`` read now and the rest when
    the repository is first opened, whatever the repositories and key provider are."""
    path = config_file(config)
    overridden = any(
        k.upper().startswith("DRKIT_") and k.upper() != "DRKIT_CONFIG" for k in os.environ
    )
    data = None if overridden else _read_toml(path)
    if lazy and data is not None:
        # what the fast path reads is enough; failing that, the full loader once needed
        simple = recovery_key is None and not repos
        loaded = _from_toml(data, path) if simple else None
        loaded = loaded or _deferred(data, path, recovery_key, one_shot, repos)
        if loaded is not None:
            return loaded
    if recovery_key is not None or not fast or repos:
        return _from_settings(path, recovery_key, one_shot, repos)
    loaded = _from_toml(data, path) if data is not None else None
    if loaded is not None:
        return loaded
    return _from_settings(path, None, one_shot, None)


def _read_toml(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return None  # the full loader explains it


def _deferred(
    data: dict[str, Any],
    path: Path,
    recovery_key: Path | None,
    one_shot: bool,
    repos: list[str] | None,
) -> WalConfig | None:
    """The paths and ``[archive]`` read like the fast path does, the repository (and with it
    the validation of everything else by the full loader) only when first opened."""
    try:
        pgdata = _required_path(_table(data, "postgres", _POSTGRES_KEYS, required=True), "pgdata")
        lock_path = _path(data, "lock_path") or default_lock_path()
        archive = _archive(_table(data, "archive", _ARCHIVE_KEYS))
        configured = data.get("repo")
        if not isinstance(configured, list) or not configured:
            raise _Unsupported
        first = repos[0] if repos else configured[0].get("name")
        if not isinstance(first, str):
            raise _Unsupported
    except (_Unsupported, AttributeError):
        return None
    full: list[WalConfig] = []

    def open_repo() -> RepoLike:
        if not full:
            full.append(_from_settings(path, recovery_key, one_shot, repos))
        return full[0].open_repository()

    fallbacks = len(repos or configured) > 1
    return WalConfig(path, pgdata, lock_path, archive, first, False, open_repo, fallbacks)


class _Unsupported(Exception):
    """Something the fast path does not handle: defer to the full loader."""


def _from_toml(data: dict[str, Any], path: Path) -> WalConfig | None:
    try:
        postgres = _table(data, "postgres", _POSTGRES_KEYS, required=True)
        pgdata = _required_path(postgres, "pgdata")
        for key in ("dsn", "host", "user", "dbname"):
            if key in postgres and not isinstance(postgres[key], str):
                raise _Unsupported
        if "port" in postgres and not _int_in(postgres["port"], 1, 65535):
            raise _Unsupported
        keys = _table(data, "keys", {"provider", "keyfile"}, required=True)
        if keys.get("provider", "keyfile") != "keyfile":
            raise _Unsupported
        keyfile = _required_path(keys, "keyfile")
        repos = data.get("repo")
        if not isinstance(repos, list) or not repos:
            raise _Unsupported
        names = set()
        for repo in repos:
            # WAL is pushed to the primary (first) repository only; the others are the
            # business of replicate, so they are only checked for a name and a known type here.
            if not isinstance(repo, dict) or repo.get("type", "posix") not in ("posix", "s3"):
                raise _Unsupported
            name = repo.get("name")
            if not isinstance(name, str) or not _REPO_NAME.fullmatch(name) or name in names:
                raise _Unsupported
            names.add(name)
        primary = repos[0]
        if primary.get("type", "posix") != "posix" or set(primary) - _REPO_KEYS:
            raise _Unsupported
        if not isinstance(primary.get("path"), str) or not primary["path"]:
            raise _Unsupported
        if not isinstance(primary.get("media", ""), str):
            raise _Unsupported
        if not isinstance(primary.get("offsite", False), bool):
            raise _Unsupported
        lock_path = _path(data, "lock_path") or default_lock_path()
        archive = _archive(_table(data, "archive", _ARCHIVE_KEYS))
    except _Unsupported:
        return None
    repo_path, repo_name = Path(primary["path"]), primary["name"]

    def open_repo() -> RepoLike:
        from drkit.storage.posix import PosixStorage

        return WalRepository(PosixStorage(repo_path, name=repo_name), partial(_keyfile, keyfile))

    return WalConfig(path, pgdata, lock_path, archive, repo_name, True, open_repo, len(repos) > 1)


def _keyfile(path: Path) -> KeyProvider:
    """The key file provider, imported when first needed ("not archived" never needs it)."""
    from drkit.crypto.keyfile import KeyfileProvider

    return KeyfileProvider(path)


def _archive(table: dict[str, Any]) -> ArchiveConfig:
    defaults = ArchiveConfig()
    async_ = table.get("async", defaults.async_)
    process_max = table.get("process_max", defaults.process_max)
    level = table.get("compress_level", defaults.compress_level)
    period = table.get("key_period", defaults.key_period)
    timeout = table.get("push_timeout", defaults.push_timeout)
    ahead = table.get("fetch_ahead", defaults.fetch_ahead)
    if not isinstance(async_, bool) or period not in ("daily", "hourly"):
        raise _Unsupported
    if not _int_in(process_max, 1, 64) or not _int_in(level, -7, 22):
        raise _Unsupported
    if not _int_in(ahead, 0, 64):
        raise _Unsupported
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise _Unsupported
    return ArchiveConfig(
        async_, _path(table, "spool_path"), process_max, level, period, float(timeout), ahead
    )


def _table(
    data: dict[str, Any], name: str, allowed: set[str], *, required: bool = False
) -> dict[str, Any]:
    table = data.get(name)
    if table is None and not required:
        return {}
    if not isinstance(table, dict) or set(table) - allowed:
        raise _Unsupported
    return table


def _path(table: dict[str, Any], key: str) -> Path | None:
    return _required_path(table, key) if table.get(key) is not None else None


def _required_path(table: dict[str, Any], key: str) -> Path:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise _Unsupported
    return Path(value)


def _int_in(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def secondary_repositories(
    path: Path, recovery_key: Path | None = None, repos: list[str] | None = None
) -> list[RepoLike]:
    """The repositories after the primary, in configured order (or in the order of ``repos``,
    only those): wal-fetch's fallbacks. Loaded with the full loader: this runs only when the
    primary cannot serve a file."""
    from drkit.repo.open import open_repository

    settings = _settings(path, recovery_key, repos)
    return [open_repository(settings, repo.name) for repo in settings.repo[1:]]


def _settings(path: Path, recovery_key: Path | None, repos: list[str] | None) -> Settings:
    """The full settings, with only the repositories ``repos`` names (in that order)."""
    from drkit.config.settings import load_settings

    settings = load_settings(path, {"keys": {"recovery_key": recovery_key}})
    if not repos:
        return settings
    by_name = {r.name: r for r in settings.repo}
    unknown = [name for name in repos if name not in by_name]
    if unknown:
        raise ConfigError(
            f"no repository named {', '.join(repr(n) for n in unknown)}",
            hint=f"configured repositories: {', '.join(by_name)}",
        )
    return settings.model_copy(update={"repo": [by_name[name] for name in dict.fromkeys(repos)]})


def _from_settings(
    path: Path, recovery_key: Path | None, one_shot: bool, repos: list[str] | None
) -> WalConfig:
    from drkit.crypto.providers import open_provider
    from drkit.repo.open import open_storage
    from drkit.repo.repository import Repository

    settings = _settings(path, recovery_key, repos)
    a = settings.archive
    archive = ArchiveConfig(
        a.async_,
        a.spool_path,
        a.process_max,
        a.compress_level,
        a.key_period,
        float(a.push_timeout),
        a.fetch_ahead,
    )
    # Only the async pusher reads pg_wal; wal-fetch and a synchronous wal-push run anywhere
    pgdata = settings.postgres.local_pgdata() if a.async_ else settings.postgres.pgdata or Path()
    return WalConfig(
        path,
        pgdata,
        settings.lock_path,
        archive,
        settings.repo[0].name,
        False,
        lambda: Repository(
            open_storage(settings.repo[0]), open_provider(settings.keys, one_shot=one_shot)
        ),
        len(settings.repo) > 1,
    )
