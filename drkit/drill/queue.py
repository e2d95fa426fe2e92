"""Drill records no repository took yet: kept on this host until a drill can seal them.

A drill record is sealed with a fresh data key from the configured key provider. When the
provider cannot make one (Vault unreachable, sealed or denying: the key-loss scenario run while
Vault really is gone), or no repository takes the record, the record is not lost: it is queued
in ``<[drill] sandbox>/queued-records/<id>.json`` and the next drill that can seal records
writes it into every repository (then removes it here). ``drkit drill list`` shows queued
records beside the repositories' ones.

Why a local queue and not a record sealed for the escrow key alone: the provider is what every
reader (``drill list``, ``info``, reports, retention) opens records with. A record readable
only with the offline recovery key would stay unreadable to them after Vault is back, and
anyone holding the public escrow key could forge one. The queued record is plain JSON, as the
drill printed it: it holds no key material. The queue is private like drkit's lock and spool
directories (``drkit.private_dir``): a directory of the user drkit runs as, writable by no one
else, never a link; every file is opened relative to it without following links and taken only
when it is a plain file of that user, with one link, readable by no one else. Whoever could
plant a record there could seal records with the provider directly.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from drkit.config.settings import Settings
from drkit.crypto.base import KeyProvider
from drkit.errors import DrillRecordNotWritten, DrkitError, DrkitWarning, UnsafePathError
from drkit.private_dir import open_private_dir
from drkit.repo.drill_copies import write_drill_record_everywhere
from drkit.repo.drills import DrillRecord, drill_record_key, is_drill_id
from drkit.repo.open import open_key_provider, open_storage

QUEUE_DIR = "queued-records"
_HINT = "remove it; the queue holds only files drkit wrote (mode 0600, its own user)"


@dataclass(frozen=True)
class QueuedRecord:
    """A record in the queue, or why the file that claims to be one cannot be taken."""

    id: str
    record: DrillRecord | None = None
    error: str | None = None


class RecordQueue:
    """The queue of drill records under ``sandbox`` (the ``[drill] sandbox`` directory)."""

    def __init__(self, sandbox: Path) -> None:
        self.path = sandbox / QUEUE_DIR

    def put(self, record: DrillRecord) -> Path:
        """Queue ``record`` (write-once, 0600, synced). Raises DrkitError when it cannot."""
        fd = open_private_dir(self.path)
        name = f"{record.id}.json"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                out = os.open(name, flags, 0o600, dir_fd=fd)
            except OSError as exc:
                raise DrkitError(
                    f"cannot queue drill record in '{self.path / name}':"
                    f" {(exc.strerror or str(exc)).lower()}"
                ) from None
            with open(out, "wb") as file:
                file.write(record.model_dump_json(indent=2).encode())
                file.flush()
                os.fsync(file.fileno())
            os.fsync(fd)
        finally:
            os.close(fd)
        return self.path / name

    def records(self) -> list[QueuedRecord]:
        """Every queued record, oldest first; nothing when there is no queue."""
        if not self.path.exists() and not self.path.is_symlink():
            return []
        fd = open_private_dir(self.path)
        try:
            names = sorted(n for n in os.listdir(fd) if n.endswith(".json"))
            return [self._read(fd, name) for name in names]
        finally:
            os.close(fd)

    def remove(self, drill_id: str) -> None:
        """Drop a record once a repository holds it."""
        fd = open_private_dir(self.path)
        try:
            os.unlink(f"{drill_id}.json", dir_fd=fd)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    def _read(self, dir_fd: int, name: str) -> QueuedRecord:
        drill_id = name.removesuffix(".json")
        path = self.path / name
        if not is_drill_id(drill_id):
            return QueuedRecord(drill_id, error=f"'{path}' is not named after a drill id")
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            what = "a symbolic link" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
            return QueuedRecord(drill_id, error=f"cannot read '{path}': {what}")
        with open(fd, "rb") as file:
            st = os.fstat(file.fileno())
            if (
                not stat.S_ISREG(st.st_mode)
                or st.st_nlink != 1
                or st.st_uid != os.geteuid()
                or st.st_mode & 0o077
            ):
                raise UnsafePathError(
                    f"refusing queued drill record '{path}': not a private plain file of the"
                    " user drkit runs as",
                    hint=_HINT,
                )
            data = file.read()
        try:
            record = DrillRecord.model_validate_json(data)
        except ValidationError as exc:
            return QueuedRecord(drill_id, error=f"'{path}' does not parse: {exc}")
        if record.id != drill_id:
            return QueuedRecord(drill_id, error=f"'{path}' holds drill '{record.id}'")
        return QueuedRecord(drill_id, record)


@dataclass
class Recorded:
    """Where a drill's record went, and which queued records went with it."""

    written: list[str] = field(default_factory=list)  # repositories holding the record
    queued: Path | None = None  # the queue file, when no repository took it
    flushed: list[str] = field(default_factory=list)  # queued drills written out now
    warnings: list[DrkitWarning] = field(default_factory=list)


def record_drill(settings: Settings, record: DrillRecord) -> Recorded:
    """Write ``record`` into every repository, sealed with the configured key provider; when
    that cannot seal it or no repository takes it, queue it. When it was written, write the
    queued records of earlier drills too. Never raises: what did not work is a warning."""
    done = Recorded()
    queue = RecordQueue(settings.drill.sandbox)
    try:
        keys = open_key_provider(settings.keys)
        copies = write_drill_record_everywhere(settings, record, keys)
    except DrkitError as exc:  # no data key to seal it: no repository can have it
        _queue(queue, record, f"it cannot be sealed: {exc.message}", done)
        return done
    done.written, done.warnings = copies.written, copies.warnings
    if not copies.ok:
        _queue(queue, record, "no repository took it", done)
        return done
    try:
        queued = queue.records()
    except DrkitError as exc:
        done.warnings.append(DrillRecordNotWritten(f"drill record queue: {exc.message}"))
        return done
    for entry in queued:
        _flush(settings, keys, queue, entry, done)
    return done


def _queue(queue: RecordQueue, record: DrillRecord, why: str, done: Recorded) -> None:
    try:
        done.queued = queue.put(record)
    except DrkitError as exc:
        done.warnings.append(
            DrillRecordNotWritten(
                f"drill record '{record.id}' was not written ({why}) and could not be queued:"
                f" {exc.message}",
                hint=exc.hint,
            )
        )
        return
    done.warnings.append(
        DrillRecordNotWritten(
            f"drill record '{record.id}' was not written ({why}); queued in '{done.queued}'",
            hint="the next drill that can seal records (key provider reachable) writes it into"
            " every repository; 'drkit drill list' shows it meanwhile",
        )
    )


def _flush(
    settings: Settings, keys: KeyProvider, queue: RecordQueue, entry: QueuedRecord, done: Recorded
) -> None:
    if entry.record is None:
        done.warnings.append(DrillRecordNotWritten(f"queued drill record: {entry.error}"))
        return
    if _held_anywhere(settings, entry.id):  # written before the queue entry was removed
        queue.remove(entry.id)
        return
    try:
        copies = write_drill_record_everywhere(settings, entry.record, keys)
    except DrkitError as exc:
        done.warnings.append(
            DrillRecordNotWritten(f"queued drill record '{entry.id}' not written: {exc.message}")
        )
        return
    done.warnings += copies.warnings
    if copies.ok:
        queue.remove(entry.id)
        done.flushed.append(entry.id)


def _held_anywhere(settings: Settings, drill_id: str) -> bool:
    for repo_settings in settings.repo:
        try:
            if open_storage(repo_settings).exists(drill_record_key(drill_id)):
                return True
        except DrkitError:
            continue
    return False
