"""Build repositories (storage driver + key provider) from settings."""

from __future__ import annotations

from drkit.config.settings import KeysSettings, RepoSettings, Settings
from drkit.crypto.base import KeyProvider
from drkit.errors import ConfigError
from drkit.repo.repository import Repository
from drkit.storage.base import Storage


def open_storage(repo: RepoSettings) -> Storage:
    from drkit.storage.posix import PosixStorage

    return PosixStorage(repo.path, name=repo.name)


def open_key_provider(keys: KeysSettings) -> KeyProvider:
    """The configured provider (with escrow), or the recovery key alone (--recovery-key)."""
    from drkit.crypto.providers import open_provider

    return open_provider(keys)


def repo_location(repo: RepoSettings) -> str:
    """A stable identity of the repository's location, for locks and messages."""
    return f"{repo.type}:{repo.path}"


def open_repository(settings: Settings, name: str | None = None) -> Repository:
    """The named repository, or the primary (first configured) one."""
    wanted = settings.repo[0] if name is None else _find(settings, name)
    return Repository(open_storage(wanted), open_key_provider(settings.keys))


def _find(settings: Settings, name: str) -> RepoSettings:
    for repo in settings.repo:
        if repo.name == name:
            return repo
    names = ", ".join(r.name for r in settings.repo)
    raise ConfigError(f"no repository named '{name}'", hint=f"configured repositories: {names}")
