"""wal-fetch as an operation: one archived WAL file from the first repository that serves it.

The primary repository is asked first; a file missing there, or unreadable or damaged there, is
fetched from the next configured repository that has it intact (a ``CopyFallback`` warning says
which and why). Only when no repository has it and every one answered cleanly is it "not
archived"; when any repository failed with an error (a damaged copy, a repository that is not
there) and no intact copy exists, that error is raised, so that PostgreSQL aborts recovery
instead of taking damage for the end of the archive. This module stays light: it runs once per
segment on PostgreSQL's critical path (secondaries load the full settings only when needed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drkit.errors import CopyFallback, DrkitError
from drkit.result import OperationResult
from drkit.wal.config import WalConfig, secondary_repositories
from drkit.wal.fetch import fetch

FETCH_NOT_FOUND = 1  # restore_command's "not archived": PostgreSQL ends recovery or waits


@dataclass
class WalFetchRequest:
    name: str  # the WAL file PostgreSQL asks for (restore_command's %f)
    dest: Path  # where to write it (%p)
    recovery_key: Path | None = None  # unwrap keys with the escrow key (never Vault)
    repos: list[str] | None = None  # only these repositories, in this order (None: every one)


@dataclass
class WalFetchResult(OperationResult):
    """``phases``: fetch (every repository tried, the file written)."""

    name: str
    fetched: bool
    repo: str | None = None  # the repository that served the file
    searched: list[str] = field(default_factory=list)  # repositories asked, in order

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
        }


def fetch_wal(config: WalConfig, request: WalFetchRequest) -> WalFetchResult:
    """Write archived WAL file ``request.name`` to ``request.dest`` from the first repository
    that serves it intact. When none does and any repository failed (damaged, unreadable, not
    there), raises the first such error (the primary's first); WalFetchError for an invalid name
    or an unwritable destination."""
    result = WalFetchResult(name=request.name, fetched=False)
    with result.phase("fetch"):
        repo = config.open_repository()
        result.searched.append(repo.name)
        problem: DrkitError | None = None
        try:
            if fetch(repo, request.name, request.dest):
                result.fetched, result.repo = True, repo.name
                return result
        except DrkitError as exc:
            problem = exc
        for other in secondary_repositories(
            config.config_path, request.recovery_key, request.repos
        ):
            result.searched.append(other.name)
            try:
                if fetch(other, request.name, request.dest):
                    why = f"unusable there: {problem.message}" if problem else "missing there"
                    result.warnings.append(
                        CopyFallback(f"WAL file {request.name} fetched from '{other.name}' ({why})")
                    )
                    result.fetched, result.repo = True, other.name
                    return result
            except DrkitError as exc:
                # A copy that is damaged, unreadable or not there is never "not archived": the
                # file may well exist, and PostgreSQL would end recovery too early.
                problem = problem or exc
        if problem is not None:
            raise problem
    return result
