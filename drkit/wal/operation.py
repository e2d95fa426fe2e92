"""wal-fetch as an operation: one archived WAL file from the first repository that serves it.

The primary repository is asked first; a file missing there, or unreadable or damaged there, is
fetched from the next configured repository that has it intact (a ``CopyFallback`` warning says
which and why). Only when no repository has it and every one answered cleanly is it "not
archived"; when any repository failed with an error (a damaged copy, a repository that is not
there) and no intact copy exists, that error is raised, so that PostgreSQL aborts recovery
instead of taking damage for the end of the archive. This module stays light: it runs once per
segment on PostgreSQL's critical path (secondaries load the full settings only when needed).

With ``prefetch`` (drkit/wal/prefetch.py) a segment the background fetcher already fetched,
through this same function, is only renamed into place; anything else is fetched here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drkit.errors import CopyFallback, DrkitError
from drkit.result import OperationResult
from drkit.wal.config import WalConfig, secondary_repositories

if TYPE_CHECKING:  # a segment taken from the prefetch spool needs neither codecs nor keys
    from drkit.repo.wal_objects import RepoLike, WalKeyring

FETCH_NOT_FOUND = 1  # restore_command's "not archived": PostgreSQL ends recovery or waits


@dataclass
class WalFetchRequest:
    name: str  # the WAL file PostgreSQL asks for (restore_command's %f)
    dest: Path  # where to write it (%p)
    recovery_key: Path | None = None  # unwrap keys with the escrow key (never Vault)
    repos: list[str] | None = None  # only these repositories, in this order (None: every one)
    prefetch: bool = False  # serve from, and start, the background fetcher ([archive] fetch_ahead)


@dataclass
class WalFetchResult(OperationResult):
    """``phases``: fetch (every repository tried, the file written)."""

    name: str
    fetched: bool
    repo: str | None = None  # the repository that served the file
    searched: list[str] = field(default_factory=list)  # repositories asked, in order
    prefetched: bool = False  # renamed into place from the background fetcher's spool

    @property
    def exit_code(self) -> int:
        """restore_command's protocol, which has no warning band: 0 written (whatever the
        warnings), 1 not archived. Errors are raised, and the CLI maps them above 125."""
        return 0 if self.fetched else FETCH_NOT_FOUND

    def _data(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "fetched": self.fetched,
            "repo": self.repo,
            "searched": self.searched,
            "prefetched": self.prefetched,
        }


class WalSources:
    """The repositories a fetch reads, in order: the primary at once, the others (which need
    the full settings) when first needed. ``cache``: keep each key period's DEK (the
    background fetcher, which fetches many files); safe to share between threads."""

    def __init__(
        self,
        config: WalConfig,
        recovery_key: Path | None = None,
        repos: list[str] | None = None,
        *,
        cache: bool = False,
    ) -> None:
        self._config, self._recovery_key, self._repos = config, recovery_key, repos
        self._cache = cache
        self._lock = threading.Lock()
        self.primary = self._with_keyring(config.open_repository())
        self._secondaries: list[tuple[RepoLike, WalKeyring | None]] | None = None

    def _with_keyring(self, repo: RepoLike) -> tuple[RepoLike, WalKeyring | None]:
        """A repository and the keyring its fetches share; None (one fetch) lets fetch() make
        one only once the file is found, so "not archived" never contacts the key provider."""
        if not self._cache:
            return repo, None
        from drkit.repo.wal_objects import WalKeyring

        return repo, WalKeyring(repo, cache=True)

    def secondaries(self) -> list[tuple[RepoLike, WalKeyring | None]]:
        with self._lock:
            if not self._config.fallbacks:
                self._secondaries = []  # known without the full settings: nothing to load
            if self._secondaries is None:
                self._secondaries = [
                    self._with_keyring(repo)
                    for repo in secondary_repositories(
                        self._config.config_path, self._recovery_key, self._repos
                    )
                ]
            return self._secondaries


def fetch_wal(config: WalConfig, request: WalFetchRequest) -> WalFetchResult:
    """Write archived WAL file ``request.name`` to ``request.dest`` from the first repository
    that serves it intact. When none does and any repository failed (damaged, unreadable, not
    there), raises the first such error (the primary's first); WalFetchError for an invalid name
    or an unwritable destination."""
    sources = partial(WalSources, config, request.recovery_key, request.repos)
    if not (request.prefetch and config.archive.fetch_ahead > 0):
        return fetch_from(sources(), request)
    from drkit.wal.prefetch import Prefetch

    with Prefetch(config, request) as ahead:
        result = ahead.take()
        if result is None:
            result = fetch_from(sources(), request)
            ahead.start(result)
        return result


def fetch_from(sources: WalSources, request: WalFetchRequest) -> WalFetchResult:
    """fetch_wal's work, from ``sources``."""
    from drkit.wal.fetch import WalFetchError, fetch

    result = WalFetchResult(name=request.name, fetched=False)
    with result.phase("fetch"):
        problem: DrkitError | None = None
        repo, keyring = sources.primary
        result.searched.append(repo.name)
        try:
            if fetch(repo, request.name, request.dest, keyring=keyring):
                result.fetched, result.repo = True, repo.name
                return result
        except WalFetchError:
            raise  # the name or the destination: no other repository does better
        except DrkitError as exc:
            problem = exc
        for other, keyring in sources.secondaries():
            result.searched.append(other.name)
            try:
                if fetch(other, request.name, request.dest, keyring=keyring):
                    why = f"unusable there: {problem.message}" if problem else "missing there"
                    result.warnings.append(
                        CopyFallback(f"WAL file {request.name} fetched from '{other.name}' ({why})")
                    )
                    result.fetched, result.repo = True, other.name
                    return result
            except WalFetchError:
                raise
            except DrkitError as exc:
                # A copy that is damaged, unreadable or not there is never "not archived": the
                # file may well exist, and PostgreSQL would end recovery too early.
                problem = problem or exc
        if problem is not None:
            raise problem
    return result
