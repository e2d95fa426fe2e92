"""Verify backups: read every object, authenticate every frame, check every checksum.

Verification needs the key (the manifest and the data are encrypted) but nothing else: no
PostgreSQL, no lock. It reports each damaged file by path and never stops at the first problem.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from drkit.config.settings import Settings
from drkit.errors import DrkitError
from drkit.progress import NoProgress, Progress
from drkit.repo.label import BackupLabel
from drkit.repo.manifest import FileEntry, Manifest, ObjectEntry
from drkit.repo.open import open_repository
from drkit.repo.reader import FileOutcome, read_object
from drkit.repo.repository import Repository


@dataclass
class BackupVerification:
    label: str
    files: int = 0
    size: int = 0
    damaged: list[tuple[str, str]] = field(default_factory=list)  # (path or object, reason)

    @property
    def ok(self) -> bool:
        return not self.damaged


@dataclass
class VerifyReport:
    repo: str
    backups: list[BackupVerification]

    @property
    def ok(self) -> bool:
        return all(b.ok for b in self.backups)


class VerifyOperation:
    def __init__(
        self,
        settings: Settings,
        backup: str | None = None,
        repo: str | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.settings = settings
        self.backup = backup
        self.repo_name = repo
        self.progress = progress or NoProgress()

    def run(self) -> VerifyReport:
        repo = open_repository(self.settings, self.repo_name)
        repo.check()
        labels = [repo.resolve(self.backup)] if self.backup else repo.backups()
        results = [self._verify_backup(repo, label) for label in labels]
        for label, result in zip(labels, results, strict=True):
            repo.write_verify_record(label, result.ok, len(result.damaged))
        return VerifyReport(repo.name, results)

    def _verify_backup(self, repo: Repository, label: BackupLabel) -> BackupVerification:
        result = BackupVerification(str(label))
        try:
            manifest, dek = repo.load_manifest(label)
        except DrkitError as exc:
            result.damaged.append(("manifest", str(exc)))
            return result
        by_object: dict[str, list[FileEntry]] = {}
        for entry in manifest.files:
            by_object.setdefault(entry.object, []).append(entry)
        self.progress.start(f"verify {label}", manifest.stats.size)

        def check(obj: ObjectEntry) -> list[FileOutcome]:
            return self._check_object(repo, manifest, obj, by_object.get(obj.key, []), dek)

        with ThreadPoolExecutor(self.settings.backup.process_max) as pool:
            for outcomes in pool.map(check, manifest.objects):
                for outcome in outcomes:
                    result.files += 1
                    result.size += outcome.entry.size
                    if outcome.error is not None:
                        result.damaged.append((outcome.entry.path, str(outcome.error)))
        self.progress.stop()
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
            return read_object(repo.storage, obj, entries, dek, manifest.label, discard)
        except DrkitError as exc:  # the object is missing or unreadable as a whole
            return [FileOutcome(entry, exc) for entry in entries]
