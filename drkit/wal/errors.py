"""Errors of the WAL commands (a light module: the async archive_command imports it)."""

from __future__ import annotations

from drkit.errors import DrkitError, ObjectExists


class WalConflict(ObjectExists):
    """A WAL file is already archived with different content; drkit never overwrites it."""


class WalSourceError(DrkitError):
    """The file PostgreSQL asked to archive is missing, unreadable or not what its name says."""


class AsyncPushError(DrkitError):
    """The async pusher reported a failure (with its exit code), or did not answer in time."""

    def __init__(self, message: str, exit_code: int = 2, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.exit_code = exit_code
