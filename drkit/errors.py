"""Error classes: the docstring is the message's meaning, the class carries its exit code.

Exit-code bands (as BorgBackup): 0 ok, 1 warning, 2 generic error, 3-99 specific errors,
100-127 specific warnings. Messages are lowercase, quote paths, and carry a hint where the user
can do something about it. No error message may contain key material.

Errors are raised; warnings (``DrkitWarning`` subclasses) are not: an operation that completes
collects them on its result (drkit/result.py), whose exit code is the warning's own code, or 1
when warnings of several kinds were collected.
"""

from __future__ import annotations

from datetime import datetime


class DrkitError(Exception):
    """A failure drkit explains to the user; never a traceback."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class DrkitWarning(DrkitError):
    """The operation completed, but something needs the operator's attention."""

    exit_code = 1

    def as_dict(self) -> dict[str, object]:
        return {
            "code": self.exit_code,
            "warning": type(self).__name__,
            "message": self.message,
            "hint": self.hint,
        }


class ConfigError(DrkitError):
    """The configuration is missing, malformed or inconsistent."""

    exit_code = 3


class PostgresError(DrkitError):
    """PostgreSQL could not be reached or refused what drkit asked."""

    exit_code = 4


class LockError(DrkitError):
    """Another drkit operation holds the lock this one needs."""

    exit_code = 5


class RepositoryError(DrkitError):
    """The repository is missing, of an unknown format, or belongs to another cluster."""

    exit_code = 6


class RepositoryMissing(RepositoryError):
    """No repository where the configuration points: no format object there (a file system that
    is not mounted, a moved directory, a missing bucket or a wrong prefix, or one never
    initialized). Commands that read treat it as an error, never as "nothing archived"."""

    exit_code = 22


def repository_missing(name: str, location: str, *, reading: bool) -> RepositoryMissing:
    """The error for a repository without its format object. ``reading``: the command reads an
    existing repository (restore, wal-fetch, verify), where creating one is never the fix."""
    message = f"repository '{name}' is not initialized: no format object in {location}"
    if reading:
        return RepositoryMissing(
            message,
            hint="is its file system mounted and readable, its bucket there, its path or prefix"
            " right? a repository that was never created holds nothing to read",
        )
    return RepositoryMissing(message, hint="run 'drkit init' first to create it")


class ArchiveCheckFailed(DrkitError):
    """'drkit check' found WAL archiving broken: archiving is off, or the segment it switched to
    did not reach the primary repository (intact) within the timeout."""

    exit_code = 23


class BackupNotFound(RepositoryError):
    """The requested backup label does not exist in the repository."""

    exit_code = 7


class BackupDeletionRefused(DrkitError):
    """'prune --backup' would break what a restore needs: other backups depend on the backup
    (without --with-dependents), or it is the newest backup, which prune always keeps."""

    exit_code = 28


class StorageError(DrkitError):
    """The storage backend failed (I/O error, full disk, unreachable server)."""

    exit_code = 8


class ObjectNotFound(StorageError):
    """A storage object does not exist."""

    exit_code = 9


class ObjectExists(StorageError):
    """A write-once object already exists; drkit never overwrites."""

    exit_code = 10


class ObjectLocked(StorageError):
    """The object is under a store's retention lock (S3 Object Lock, legal hold) and cannot be
    deleted yet; ``until`` is when the retention ends (None: a legal hold, no date)."""

    def __init__(
        self, message: str, hint: str | None = None, until: datetime | None = None
    ) -> None:
        super().__init__(message, hint)
        self.until = until


class KeyMaterialError(DrkitError):
    """Key material is missing, wrong, or cannot be obtained."""

    exit_code = 11


class VaultError(KeyMaterialError):
    """Vault is unreachable, sealed, or refused a request, so no key can be obtained."""

    exit_code = 11


class WrongKey(KeyMaterialError):
    """The data was encrypted with a different key than the one configured."""

    exit_code = 12


class UnsupportedPostgresVersion(PostgresError):
    """The server is a PostgreSQL major version drkit does not support (before 13, after 18)."""

    exit_code = 50


class PostgresBinariesNotFound(PostgresError):
    """No installed PostgreSQL server binaries of the needed major version were found."""

    exit_code = 20


class ServerControlError(PostgresError):
    """A PostgreSQL server drkit runs itself (a sandbox) would not start, promote or stop;
    ``log_tail`` holds the last lines of its server log."""

    exit_code = 21

    def __init__(self, message: str, hint: str | None = None, log_tail: str = "") -> None:
        super().__init__(message, hint)
        self.log_tail = log_tail


class IntegrityError(DrkitError):
    """Stored data failed authentication or a checksum: it is damaged or was tampered with."""

    exit_code = 13


class RestoreTargetError(DrkitError):
    """The restore target cannot be used (not empty, not writable)."""

    exit_code = 14


class ClusterRunning(RestoreTargetError):
    """A delta restore was pointed at the data directory of a running cluster (its
    postmaster.pid names a live process): nothing in it was changed."""

    exit_code = 25


class VerifyFailed(DrkitError):
    """Verification found damaged files."""

    exit_code = 15


class UnsafePathError(DrkitError):
    """A directory or file drkit reuses between runs (locks, the WAL spool) is not private to it:
    a symbolic link, owned by another user, or writable by group or others. Nothing was
    written through it."""

    exit_code = 17


class UnsafeManifest(IntegrityError):
    """A manifest asks for something no PostgreSQL backup holds (a path outside the data
    directory or outside its layout, a link, a special mode, a tablespace outside the list):
    verification reports it and restore refuses it before writing anything."""

    exit_code = 18


class DrillRestoreFailed(DrkitError):
    """A restore drill got no usable copy: the restore, the WAL replay or the start of the
    restored copy failed. The drill's record says where and why."""

    exit_code = 30


class DrillCheckFailed(DrkitError):
    """A restore drill brought the copy up, but one of its checks failed."""

    exit_code = 31


class DrillTargetMissed(DrkitError):
    """A restore drill worked, but the achieved RTO or RPO exceeded its target."""

    exit_code = 32


class EmitConflict(DrkitError):
    """``drkit schedule --emit`` found a file of the name it would write, with other content:
    it may hold an operator's changes, so it is left as it is."""

    exit_code = 33


# -- warnings: collected on an operation's result, never raised ------------------------------------


class BackupNotCopied(DrkitWarning):
    """A committed backup could not be copied to another repository yet (it is safe in the
    primary; 'drkit replicate' copies it when the repository is back)."""

    exit_code = 100


class PageChecksumFailure(DrkitWarning):
    """A data page failed its checksum while it was backed up: the backup holds the page as it
    was read, and the data file on the server needs attention."""

    exit_code = 101


class Rule321Failed(DrkitWarning):
    """The newest backup does not have 3 copies on 2 media with 1 offsite."""

    exit_code = 102


class RepositoryUnreachable(DrkitWarning):
    """A configured repository could not be read; another one served instead, or it counts as
    holding nothing."""

    exit_code = 103


class WalArchiveGap(DrkitWarning):
    """WAL segments are missing from the archive: recovery cannot replay past the gap."""

    exit_code = 104


class IncompleteBackup(DrkitWarning):
    """The repository holds the leftovers of a backup that never completed (never listed; the
    next backup removes them)."""

    exit_code = 105


class ObjectsLockedSkipped(DrkitWarning):
    """Prune left objects (and the backups they belong to) that are under a retention lock (S3
    Object Lock, legal hold); a later prune deletes them once the lock ends."""

    exit_code = 107


class CopyFallback(DrkitWarning):
    """An object was missing or damaged in one repository and was read from another copy: the
    operation succeeded, the first copy needs attention."""

    exit_code = 106


class BackupSkipped(DrkitWarning):
    """A backup's manifest (or one it depends on) fails authentication — damaged, or added by
    someone who cannot seal one: restore took an older backup, prune left it out of retention
    and kept it."""

    exit_code = 109


class DrillRecordNotWritten(DrkitWarning):
    """A drill's record could not be written to one repository; the others have it, and
    'drkit replicate' copies it there later."""

    exit_code = 114


class KeyRecordSkipped(DrkitWarning):
    """A key record set that rewrap cannot move (wrapped by another key, or unreadable) was left
    as it is: what it protects stays readable only with the key that wrapped it."""

    exit_code = 116


class DrillRecordUnauthentic(DrkitWarning):
    """A repository's copy of a drill record fails authentication or does not parse: it was
    damaged or tampered with."""

    exit_code = 117


class ReportPdfUnavailable(DrkitError):
    """A PDF report was asked for, but WeasyPrint (or the Pango library it needs) is missing.
    The other formats are written all the same."""

    exit_code = 43


class DrillNotFound(DrkitError):
    """A note names a drill that no repository has a record of."""

    exit_code = 44


class ArchivingFailing(DrkitWarning):
    """PostgreSQL's archive_command is failing (pg_stat_archiver: the last failure is newer than
    the last success, or failures were counted meanwhile): point-in-time recovery past the
    last archived segment is impossible until it works again."""

    exit_code = 108


class DataChecksumsOff(DrkitWarning):
    """The cluster runs without data checksums: a damaged page is backed up as it is read, and
    neither the backup nor a restore can tell."""

    exit_code = 112


class WalNotCopied(DrkitWarning):
    """An archived WAL segment has not reached a secondary repository yet (the async pusher or
    'drkit replicate' copies it there)."""

    exit_code = 110


class NoRetention(DrkitWarning):
    """No retention is configured for a repository: prune keeps every backup, and the
    repository grows until its storage is full."""

    exit_code = 111


class LeaseHeld(LockError):
    """Another host (or a process this host cannot see) holds the repository's lease for this
    kind of operation, and the lease has not expired: a backup, prune, replicate or key rewrap
    runs there now."""

    exit_code = 38


class LeaseLost(LockError):
    """The operation's lease in the repository could not be renewed in time, or another host
    took it over once it expired: the operation stopped before it could make anything visible
    that the new holder might delete."""

    exit_code = 39


class LeaseTakenOver(DrkitWarning):
    """The repository's lease was taken over from a holder on another host whose lease had
    expired without being released (the host died, hung or lost the repository): the objects it
    may have left are removed once they are older than ``[lease] leftover_age``."""

    exit_code = 115


class RemotePrivilegeMissing(DrkitError):
    """Remote mode: the role drkit connects as lacks an attribute or a grant a backup over a
    replication connection needs (docs/remote.md lists the role)."""

    exit_code = 41


class RemoteTlsError(PostgresError):
    """Remote mode: TLS to PostgreSQL failed, most often a server certificate that the configured
    CA did not sign or that names another host."""

    exit_code = 42


class UnsafePassfile(ConfigError):
    """The configured password file is missing or readable by others."""

    exit_code = 45


class RemoteUnsupported(DrkitError):
    """Remote mode cannot do what was asked: a server before PostgreSQL 15 (whose BASE_BACKUP
    speaks another protocol)."""

    exit_code = 46


class UnauthenticRecord(DrkitWarning):
    """A verification record newer than the newest authentic one is not signed by the
    repository's signing key (forged, or damaged): it is ignored, whatever it says."""

    exit_code = 113
