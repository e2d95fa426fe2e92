"""Build repositories (storage driver + key provider) from settings."""

from __future__ import annotations

from drkit.config.settings import KeysSettings, RepoSettings, S3Repo, Settings
from drkit.crypto.base import KeyProvider
from drkit.errors import ConfigError
from drkit.repo.repository import Repository
from drkit.storage.base import Storage


def open_storage(repo: RepoSettings) -> Storage:
    if isinstance(repo, S3Repo):
        return _open_s3(repo)
    from drkit.storage.posix import PosixStorage

    return PosixStorage(repo.path, name=repo.name)


def _open_s3(repo: S3Repo) -> Storage:
    # Imported here: boto3 is heavy, and only S3 repositories need it.
    from drkit.storage.s3 import ObjectLock, S3Config, S3Storage

    lock = repo.object_lock
    try:
        config = S3Config(
            bucket=repo.bucket,
            prefix=repo.prefix,
            region=repo.region,
            endpoint_url=repo.endpoint_url,
            force_path_style=repo.force_path_style,
            profile=repo.profile,
            storage_class=repo.storage_class,
            sse=repo.sse,
            sse_kms_key_id=repo.sse_kms_key_id,
            object_lock=ObjectLock(lock.mode, lock.days) if lock is not None else None,
            multipart_threshold=repo.multipart_threshold,
            part_size=repo.part_size,
            max_concurrency=repo.max_concurrency,
            max_attempts=repo.max_attempts,
            connect_timeout=repo.connect_timeout,
            read_timeout=repo.read_timeout,
        )
    except ValueError as err:
        raise ConfigError(f"repository '{repo.name}': {err}") from None
    return S3Storage(config, name=repo.name)


def open_key_provider(keys: KeysSettings) -> KeyProvider:
    """The configured provider (with escrow), or the recovery key alone (--recovery-key)."""
    from drkit.crypto.providers import open_provider

    return open_provider(keys)


def repo_location(repo: RepoSettings) -> str:
    """A stable identity of the repository's location, for locks and messages."""
    if isinstance(repo, S3Repo):
        endpoint = repo.endpoint_url or f"aws:{repo.region or 'default'}"
        return f"s3:{endpoint}/{repo.bucket}/{repo.prefix.strip('/')}"
    return f"{repo.type}:{repo.path}"


def open_repository(settings: Settings, name: str | None = None) -> Repository:
    """The named repository, or the primary (first configured) one."""
    wanted = settings.repo[0] if name is None else _find(settings, name)
    return Repository(open_storage(wanted), open_key_provider(settings.keys))


def select_repositories(settings: Settings, name: str | None = None) -> list[RepoSettings]:
    """Every configured repository, or only the named one (ConfigError naming the configured
    ones when there is none of that name)."""
    return list(settings.repo) if name is None else [_find(settings, name)]


def _find(settings: Settings, name: str) -> RepoSettings:
    for repo in settings.repo:
        if repo.name == name:
            return repo
    names = ", ".join(r.name for r in settings.repo)
    raise ConfigError(f"no repository named '{name}'", hint=f"configured repositories: {names}")
