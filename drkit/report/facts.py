"""Read what a report needs from the repositories: the only part of the report that does I/O.

The report is made from one *source* repository (``--repo``, else the first configured one that
can be read): its backups, drill records, notes and key records. A drill record and a note are
written into every repository and backups are copied there, so the offsite copy alone gives the
same report as the primary. What differs per repository — which backups each holds, its WAL,
its verification runs — is read from every configured repository that can be reached; one that
cannot is listed with its error, never silently left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime

from drkit.config.settings import S3Repo, Settings
from drkit.errors import DrkitError, IntegrityError, RepositoryError
from drkit.info.copies import CopyMap
from drkit.repo.drills import DrillEntry
from drkit.repo.events import EVENT_PREFIX
from drkit.repo.key_records import describe, record_sets
from drkit.repo.label import BackupLabel
from drkit.repo.notes import NoteEntry, read_notes
from drkit.repo.open import open_repository
from drkit.repo.repository import BACKUP_PREFIX, Repository
from drkit.repo.wal_archive import WalArchive
from drkit.report.model import RepositoryFacts
from drkit.report.period import Period

_STAMP = "%Y%m%dT%H%M%S.%fZ"  # of verification and job records


@dataclass(frozen=True)
class BackupFact:
    label: str
    type: str
    start: datetime
    stop: datetime
    duration_s: float
    size: int
    stored: int


@dataclass(frozen=True)
class VerifyFact:
    repo: str
    label: str
    time: datetime
    ok: bool
    damaged: int
    key: str  # the verification record's object key


@dataclass(frozen=True)
class WalFact:
    repo: str
    segments: int
    newest: str | None
    newest_at: datetime | None
    lag: int | None  # WAL files the primary holds and this one lacks (None: the primary)


@dataclass(frozen=True)
class KeySetFact:
    kind: str  # backup | wal | drill
    name: str  # label, WAL key period, drill id
    provider: str
    key: str
    version: int | None
    escrowed: bool


@dataclass(frozen=True)
class FailureFact:
    """A backup run that failed, from the primary's job records."""

    job: str  # full | diff | incr
    time: datetime
    exit_code: int
    error: str
    key: str  # the job record's object key


BACKUP_JOBS = ("full", "diff", "incr")


@dataclass
class Facts:
    source: str
    system_identifier: str
    repositories: list[RepositoryFacts]
    backups: list[BackupFact] = field(default_factory=list)  # the period's, and the one before
    damaged: dict[str, str] = field(default_factory=dict)  # label -> why it cannot be read
    holdings: dict[str, set[str]] = field(default_factory=dict)  # repository -> labels
    drills: list[DrillEntry] = field(default_factory=list)
    notes: list[NoteEntry] = field(default_factory=list)
    verify: list[VerifyFact] = field(default_factory=list)
    wal: list[WalFact] = field(default_factory=list)
    key_sets: list[KeySetFact] = field(default_factory=list)
    failures: list[FailureFact] | None = None  # None: the primary's job records cannot be read


def gather(settings: Settings, period: Period, repo_name: str | None) -> Facts:
    """Everything the report of ``period`` shows, read from the repositories."""
    source = _open_source(settings, repo_name)
    fmt = source.check()
    copies = CopyMap.scan(settings)
    for name, error in _unreadable(settings).items():  # e.g. a directory that is gone
        copies.unreachable.setdefault(name, error)
        copies.holdings[name], copies.wal[name] = set(), set()
    facts = Facts(
        source=source.name,
        system_identifier=fmt.system_identifier,
        repositories=_repositories(settings, copies.unreachable),
        holdings=copies.holdings,
    )
    _read_backups(source, period, facts)
    facts.drills = source.drill_records()
    facts.notes = read_notes(source)
    facts.verify = _read_verify_runs(settings, copies.unreachable)
    facts.wal = _read_wal(settings, copies)
    facts.key_sets = _read_key_sets(source)
    facts.failures = _read_failures(settings, period, copies.unreachable)
    return facts


def _open_source(settings: Settings, wanted: str | None) -> Repository:
    """The named repository, or the first configured one that can be read."""
    if wanted is not None:
        return open_repository(settings, wanted)
    errors = []
    for repo_settings in settings.repo:
        try:
            repo = open_repository(settings, repo_settings.name)
            repo.check()
            return repo
        except DrkitError as exc:
            errors.append(f"'{repo_settings.name}': {exc.message}")
    raise RepositoryError(
        "no configured repository can be read: " + "; ".join(errors),
        hint="name a readable one with --repo",
    )


def _unreadable(settings: Settings) -> dict[str, str]:
    """Repositories whose format object cannot be read, with the reason."""
    found = {}
    for repo_settings in settings.repo:
        try:
            open_repository(settings, repo_settings.name).check()
        except DrkitError as exc:
            found[repo_settings.name] = exc.message
    return found


def _repositories(settings: Settings, unreachable: dict[str, str]) -> list[RepositoryFacts]:
    found = []
    for repo in settings.repo:
        lock = None
        if isinstance(repo, S3Repo) and repo.object_lock is not None:
            lock = f"{repo.object_lock.mode} {repo.object_lock.days}d"
        found.append(
            RepositoryFacts(
                name=repo.name,
                type=repo.type,
                media=repo.media,
                offsite=repo.offsite,
                object_lock=lock,
                reachable=repo.name not in unreachable,
                error=unreachable.get(repo.name),
            )
        )
    return found


def _read_backups(repo: Repository, period: Period, facts: Facts) -> None:
    """The manifests of the backups started in the period, and of the newest one before it
    (the exposure at the period's start is counted from it)."""
    labels = [label for label in repo.backups() if label.time < period.end]
    before = [label for label in labels if label.time < period.start]
    wanted = before[-1:] + [label for label in labels if label.time >= period.start]
    for label in wanted:
        try:
            manifest, _ = repo.load_manifest(label)
        except IntegrityError as exc:
            facts.damaged[str(label)] = exc.message
            continue
        facts.backups.append(
            BackupFact(
                label=manifest.label,
                type=manifest.type,
                start=manifest.start_time,
                stop=manifest.stop_time,
                duration_s=manifest.stats.duration_s,
                size=manifest.stats.size,
                stored=manifest.stats.stored,
            )
        )


def _read_verify_runs(settings: Settings, unreachable: dict[str, str]) -> list[VerifyFact]:
    """Every verification record of every reachable repository (``backup/<label>/verify/``)."""
    runs = []
    for repo_settings in settings.repo:
        if repo_settings.name in unreachable:
            continue
        try:
            repo = open_repository(settings, repo_settings.name)
            keys = [o.key for o in repo.storage.list(BACKUP_PREFIX) if "/verify/" in o.key]
            for key in keys:
                runs.append(_verify_fact(repo, key))
        except DrkitError as exc:
            unreachable[repo_settings.name] = exc.message
    return runs


def _verify_fact(repo: Repository, key: str) -> VerifyFact:
    label, _, name = key[len(BACKUP_PREFIX) :].partition("/verify/")
    try:
        when = datetime.strptime(name.removesuffix(".json"), _STAMP).replace(tzinfo=UTC)
    except ValueError:
        when = BackupLabel(label).time
    try:
        record = json.loads(repo.storage.read_bytes(key))
        ok, damaged = bool(record["ok"]), int(record.get("damaged_files", 0))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        ok, damaged = False, 0  # a verification record that does not parse proves nothing
    return VerifyFact(repo.name, label, when, ok, damaged, key)


def _read_wal(settings: Settings, copies: CopyMap) -> list[WalFact]:
    """Each reachable repository's WAL, and how far it is behind the primary (the first
    configured repository, where WAL is archived first; no lag is known without it)."""
    primary = settings.repo[0].name
    lag = {} if primary in copies.unreachable else copies.wal_lag(primary)
    found = []
    for repo_settings in settings.repo:
        name = repo_settings.name
        if name in copies.unreachable:
            continue
        newest = newest_at = None
        segments = 0
        try:
            archive = WalArchive(open_repository(settings, name))
            for timeline in archive.timelines():
                names = archive.segments(timeline)
                segments += len(names)
                if names:
                    newest = names[-1]  # the highest timeline's newest segment comes last
            if newest is not None:
                newest_at = archive.pushed_at(newest)
        except DrkitError as exc:
            copies.unreachable[name] = exc.message
            continue
        found.append(WalFact(name, segments, newest, newest_at, lag.get(name)))
    return found


def _read_failures(
    settings: Settings, period: Period, unreachable: dict[str, str]
) -> list[FailureFact] | None:
    """Failed backup runs of the period: ``drkit backup`` and the scheduler record each run in
    the primary (first configured) repository only, so without it failures are unknown."""
    primary = settings.repo[0].name
    if primary in unreachable:
        return None
    try:
        repo = open_repository(settings, primary)
        found = []
        for job in BACKUP_JOBS:
            for obj in repo.storage.list(f"{EVENT_PREFIX}{job}/"):
                if not obj.key.endswith("-fail.json"):
                    continue
                name = obj.key.rsplit("/", 1)[-1].removesuffix("-fail.json")
                try:
                    when = datetime.strptime(name, _STAMP).replace(tzinfo=UTC)
                except ValueError:
                    continue
                if when in period:
                    found.append(_failure(repo, job, when, obj.key))
    except DrkitError:
        return None
    return sorted(found, key=lambda f: f.time)


def _failure(repo: Repository, job: str, when: datetime, key: str) -> FailureFact:
    try:
        record = json.loads(repo.storage.read_bytes(key))
        return FailureFact(job, when, int(record["exit_code"]), str(record["error"]), key)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return FailureFact(job, when, 2, "(the job record does not parse)", key)


def _read_key_sets(repo: Repository) -> list[KeySetFact]:
    found = []
    for record_set in record_sets(repo):
        newest = record_set.newest()
        if newest is None or newest.record is None:
            continue
        try:
            key = describe(newest.record)
        except IntegrityError:
            continue
        found.append(
            KeySetFact(
                record_set.kind,
                record_set.name,
                key.provider,
                key.key,
                key.version,
                newest.escrow_recipient is not None,
            )
        )
    return found
