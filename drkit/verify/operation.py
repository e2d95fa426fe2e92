"""Verify backups: read every object, authenticate every frame, check every checksum.

Verification needs the key (the manifest and the data are encrypted) but nothing else: no
PostgreSQL, no lock. It reports each damaged file by path and never stops at the first problem.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from drkit.config.settings import Settings
from drkit.errors import (
    DrkitError,
    DrkitWarning,
    KeyMaterialError,
    ObjectNotFound,
    UnauthenticRecord,
    VerifyFailed,
)
from drkit.pools import worker_pool
from drkit.progress import NoProgress, Progress
from drkit.repo.identity import check_identity
from drkit.repo.label import BackupLabel
from drkit.repo.manifest import FileEntry, Manifest, ObjectEntry
from drkit.repo.open import open_repository
from drkit.repo.reader import FileOutcome, read_object
from drkit.repo.repository import Repository
from drkit.repo.safety import manifest_problems
from drkit.repo.wal_names import history_name
from drkit.result import OperationResult

if TYPE_CHECKING:
    from drkit.repo.wal_archive import WalArchive


@dataclass
class BackupVerification:
    label: str
    files: int = 0
    size: int = 0
    damaged: list[tuple[str, str]] = field(default_factory=list)  # (path or object, reason)
    depends_on: list[str] = field(default_factory=list)  # the backups its chain needs
    unrestorable: str | None = None  # intact itself, but a backup it depends on is not

    @property
    def ok(self) -> bool:
        return not self.damaged and self.unrestorable is None


@dataclass
class WalVerification:
    """The archived WAL read back: every object authenticated, gaps inside each timeline."""

    files: int = 0
    damaged: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)
    gaps: list[tuple[int, str, str]] = field(default_factory=list)  # (timeline, first, last)
    # Timelines no backup of this repository leads to: (timeline, why); e.g. pushed by a
    # restored copy of another cluster, or whose history file is missing
    foreign: list[tuple[int, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.gaps and not self.foreign


@dataclass
class VerifyReport(OperationResult):
    """What verify read back. ``exit_code`` is VerifyFailed's (15) when anything is damaged or
    unrestorable, or a WAL gap or foreign timeline was found. ``phases``: backups (every object
    of every backup read back), wal."""

    repo: str
    backups: list[BackupVerification]
    wal: WalVerification | None = None  # when asked for (VerifyOperation(wal=True))

    @property
    def ok(self) -> bool:
        return all(b.ok for b in self.backups) and (self.wal is None or self.wal.ok)

    @property
    def exit_code(self) -> int:
        return super().exit_code if self.ok else VerifyFailed.exit_code

    @property
    def failure(self) -> str | None:
        """Why a run with this result counts as a failed job; None when it succeeded."""
        return None if self.ok else "verification found damage ('drkit verify' shows where)"

    def _data(self) -> dict[str, Any]:
        wal = self.wal
        return {
            "repo": self.repo,
            "ok": self.ok,
            "backups": [
                {
                    "label": b.label,
                    "ok": b.ok,
                    "files": b.files,
                    "size": b.size,
                    "damaged": [{"path": p, "reason": r} for p, r in b.damaged],
                    "unrestorable": b.unrestorable,
                }
                for b in self.backups
            ],
            "wal": None
            if wal is None
            else {
                "ok": wal.ok,
                "files": wal.files,
                "damaged": [{"name": n, "reason": r} for n, r in wal.damaged],
                "gaps": [{"timeline": t, "first": a, "last": b} for t, a, b in wal.gaps],
                "foreign_timelines": [{"timeline": t, "reason": r} for t, r in wal.foreign],
            },
        }


def verify_backups(
    settings: Settings,
    backup: str | None = None,
    repo: str | None = None,
    progress: Progress | None = None,
    *,
    wal: bool = False,
) -> VerifyReport:
    """Read back ``backup`` (default: every backup) of ``repo`` (default: the primary), and with
    ``wal`` every archived WAL file; damage is reported, never raised."""
    return VerifyOperation(settings, backup, repo, progress, wal=wal).run()


class VerifyOperation:
    def __init__(
        self,
        settings: Settings,
        backup: str | None = None,
        repo: str | None = None,
        progress: Progress | None = None,
        *,
        wal: bool = False,
    ) -> None:
        self.settings = settings
        self.backup = backup
        self.repo_name = repo
        self.progress = progress or NoProgress()
        self.wal = wal

    def run(self) -> VerifyReport:
        repo = open_repository(self.settings, self.repo_name)
        repo.check(reading=True)
        check_identity(repo.storage, repo.keys)  # a wrong key is not damage: nothing recorded
        report = VerifyReport(repo=repo.name, backups=[])
        with report.phase("backups"):
            labels = [repo.resolve(self.backup)] if self.backup else repo.backups()
            report.backups = [self._verify_backup(repo, label) for label in labels]
            self._mark_broken_chains(repo, report.backups)
            for label in labels:  # before this run's record makes them older than an authentic one
                report.warnings += _unauthentic_records(repo, label)
            for label, result in zip(labels, report.backups, strict=True):
                repo.write_verify_record(label, result.ok, len(result.damaged))
        if self.wal:
            with report.phase("wal"):
                report.wal = self._verify_wal(repo)
        return report

    @staticmethod
    def _mark_broken_chains(repo: Repository, results: list[BackupVerification]) -> None:
        """A diff or incr restores only with every backup it depends on: one that is damaged
        (found here, or by the last verification of a backup not verified here) or missing
        makes it unrestorable, however intact its own files are."""
        damaged = {r.label for r in results if r.damaged}
        verified = {r.label for r in results}
        present = {str(label) for label in repo.backups()}
        for result in results:
            for member in result.depends_on:
                if member in damaged:
                    reason = "is damaged"
                elif member not in present:
                    reason = "is missing"
                elif member not in verified and not repo.verified_ok(BackupLabel(member)):
                    reason = "failed its last verification"
                else:
                    continue
                result.unrestorable = f"backup '{member}', which it depends on, {reason}"
                break

    def _verify_wal(self, repo: Repository) -> WalVerification:
        from drkit.repo.wal_archive import WalArchive

        archive = WalArchive(repo)
        result = WalVerification()
        names = [name for timeline in archive.timelines() for name in archive.files(timeline)]

        def check(name: str) -> str | None:
            try:
                archive.check(name)
            except DrkitError as exc:
                return str(exc)
            return None

        with worker_pool(self.settings.backup.process_max, "verify") as pool:
            for name, error in zip(names, pool.map(check, names), strict=True):
                result.files += 1
                if error is not None:
                    result.damaged.append((name, error))
        for summary in archive.summarize():
            result.gaps += [(summary.timeline, first, last) for first, last in summary.missing]
        result.foreign = self._foreign_timelines(repo, archive)
        return result

    def _foreign_timelines(self, repo: Repository, archive: WalArchive) -> list[tuple[int, str]]:
        """Archived timelines that do not descend from timeline 1 or a backup's timeline: their
        history file is missing or names none of them. Such WAL was not pushed by the cluster
        these backups came from (or its history was lost), and a restore to the latest timeline
        would follow it."""
        known = {1}
        for label in repo.backups():
            try:
                known.add(repo.load_manifest(label)[0].timeline)
            except DrkitError:
                continue  # reported with the backup
        foreign = []
        for timeline in archive.timelines():
            if timeline in known:
                continue
            try:
                ancestors = [parent for parent, _ in archive.history(timeline)]
            except ObjectNotFound:
                foreign.append((timeline, f"its history file {history_name(timeline)} is missing"))
                continue
            except DrkitError as exc:
                foreign.append((timeline, str(exc)))
                continue
            if not known & set(ancestors):
                path = " -> ".join(str(t) for t in [*ancestors, timeline])
                foreign.append(
                    (timeline, f"its history ({path}) leads from no timeline of this repository")
                )
        return foreign

    def _verify_backup(self, repo: Repository, label: BackupLabel) -> BackupVerification:
        result = BackupVerification(str(label))
        try:
            manifest, dek = repo.load_manifest(label)
        except KeyMaterialError:
            raise  # the key cannot read it, which says nothing about the backup
        except DrkitError as exc:
            result.damaged.append(("manifest", str(exc)))
            return result
        result.depends_on = list(manifest.chain[:-1])
        by_object: dict[str, list[FileEntry]] = {}
        result.damaged += [("manifest", f"unsafe entry {p}") for p in manifest_problems(manifest)]
        for entry in manifest.files:
            by_object.setdefault(entry.object, []).append(entry)
        self.progress.start(f"verify {label}", manifest.stats.size)

        def check(obj: ObjectEntry) -> list[FileOutcome]:
            return self._check_object(repo, manifest, obj, by_object.get(obj.key, []), dek)

        try:
            with worker_pool(self.settings.backup.process_max, "verify") as pool:
                for outcomes in pool.map(check, manifest.objects):
                    for outcome in outcomes:
                        result.files += 1
                        result.size += outcome.entry.size
                        if outcome.error is not None:
                            result.damaged.append((outcome.entry.path, str(outcome.error)))
        finally:
            self.progress.stop()  # also when interrupted: the error is not printed over a bar
        result.damaged.sort()
        return result

    def _check_object(
        self,
        repo: Repository,
        manifest: Manifest,
        obj: ObjectEntry,
        entries: list[FileEntry],
        dek: bytes,
    ) -> list[FileOutcome]:
        def discard(_entry: FileEntry, chunks: Iterator[bytes]) -> None:
            for chunk in chunks:
                self.progress.advance(len(chunk))

        try:
            return read_object(repo, obj, entries, dek, manifest.label, discard)
        except DrkitError as exc:  # the object is missing or unreadable as a whole
            return [FileOutcome(entry, exc) for entry in entries]


def _unauthentic_records(repo: Repository, label: BackupLabel) -> list[DrkitWarning]:
    return [
        UnauthenticRecord(
            f"verification record '{key}' is not signed by the signing key of repository"
            f" '{repo.name}': ignored",
            hint="someone who can write to the repository added it, or it is damaged;"
            " remove it once Object Lock allows",
        )
        for key in repo.unauthentic_verify_records(label)
    ]
