"""Read what a report needs from the repositories: the only part of the report that does I/O.

The report is made from one *source* repository (``--repo``, else the first configured one that
can be read): its backups, drill records, notes and key records. A drill record and a note are
written into every repository and backups are copied there, so the offsite copy alone gives the
same report as the primary; a record or note only another reachable repository holds is read
from there. What differs per repository — which backups each holds, its WAL,
its verification runs — is read from every configured repository that can be reached; one that
cannot is listed with its error, never silently left out.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

from drkit.config.settings import S3Repo, Settings
from drkit.errors import DrkitError, IntegrityError, ObjectNotFound, RepositoryError, WrongKey
from drkit.info.copies import CopyMap
from drkit.repo.drills import DrillEntry
from drkit.repo.events import EVENT_PREFIX, read_event
from drkit.repo.label import BackupLabel
from drkit.repo.notes import NoteEntry, note_ids, read_note, read_notes
from drkit.repo.open import open_repository
from drkit.repo.repository import BACKUP_PREFIX, Repository
from drkit.repo.wal_archive import WalArchive
from drkit.repo.wal_names import WAL_PREFIX, parse_wal_name
from drkit.report.keysets import KeySetFact, key_sets, unwrap_newest
from drkit.report.model import RepositoryFacts
from drkit.report.period import Period

_STAMP = "%Y%m%dT%H%M%S.%fZ"  # of verification and job records

log = logging.getLogger(__name__)


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
    """Everything the report of ``period`` shows, read from the repositories. Each repository's
    ``backup/`` is listed once: on a repository of thousands of backups, listing is most of
    the cost."""
    source = _open_source(settings, repo_name)
    fmt = source.check()
    unreachable = _unreadable(settings)  # e.g. a directory that is gone
    listings = _list_repositories(settings, unreachable)
    copies = CopyMap(
        holdings={name: listing.manifests for name, listing in listings.items()},
        wal={name: listing.wal for name, listing in listings.items()},
        unreachable=unreachable,
    )
    facts = Facts(
        source=source.name,
        system_identifier=fmt.system_identifier,
        repositories=[],
        holdings=copies.holdings,
    )
    source_listing = listings.get(source.name) or _Listing.of(source)
    _read_backups(source, source_listing, period, facts)
    facts.drills, facts.notes, holders = _read_records(settings, source, unreachable)
    facts.verify = _read_verify_runs(settings, listings)
    facts.wal = _read_wal(settings, copies)
    facts.key_sets += key_sets(source, period, holders)
    facts.failures = _read_failures(settings, period, unreachable)
    # last: every step above may have found a repository it could not read
    facts.repositories = _repositories(settings, unreachable)
    return facts


@dataclass
class _Listing:
    """What one listing of a repository's ``backup/`` and ``wal/`` says."""

    manifests: set[str]  # labels with a manifest: the backups it holds
    key_records: dict[str, list[str]]  # label -> its key records' object keys, oldest first
    verify: list[str]  # verification records' object keys
    wal: set[str]  # WAL object keys

    @classmethod
    def of(cls, repo: Repository) -> _Listing:
        listing = cls(set(), {}, [], {o.key for o in repo.storage.list(WAL_PREFIX)})
        for obj in repo.storage.list(BACKUP_PREFIX):
            parts = obj.key.split("/")
            if len(parts) < 3 or not BackupLabel.is_label(parts[1]):
                continue
            if parts[2] == "manifest":
                listing.manifests.add(parts[1])
            elif parts[2] == "key" and len(parts) == 4:
                listing.key_records.setdefault(parts[1], []).append(obj.key)
            elif parts[2] == "verify":
                listing.verify.append(obj.key)
        return listing


def _list_repositories(settings: Settings, unreachable: dict[str, str]) -> dict[str, _Listing]:
    found = {}
    for repo_settings in settings.repo:
        name = repo_settings.name
        if name in unreachable:
            continue
        try:
            found[name] = _Listing.of(open_repository(settings, name))
        except DrkitError as exc:
            unreachable[name] = exc.message
    return found


def _read_records(
    settings: Settings, source: Repository, unreachable: dict[str, str]
) -> tuple[list[DrillEntry], list[NoteEntry], dict[str, Repository]]:
    """Every drill record and note of the source, and those only another reachable repository
    holds (a drill or note that could not be written to the source is still reported; its
    copy there is read and authenticated the same way); with the repository each was read from."""
    drills = {e.id: e for e in source.drill_records()}
    notes = {e.id: e for e in read_notes(source)}
    holders = dict.fromkeys([*drills, *notes], source)
    for repo_settings in settings.repo:
        name = repo_settings.name
        if name == source.name or name in unreachable:
            continue
        try:
            repo = open_repository(settings, name)
            for drill_id in set(repo.drill_ids()) - drills.keys():
                drills[drill_id], holders[drill_id] = repo.drill_record(drill_id), repo
            for note_id in set(note_ids(repo)) - notes.keys():
                notes[note_id], holders[note_id] = read_note(repo, note_id), repo
        except DrkitError as exc:
            unreachable[name] = exc.message
    return [drills[k] for k in sorted(drills)], [notes[k] for k in sorted(notes)], holders


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


def _read_backups(repo: Repository, listing: _Listing, period: Period, facts: Facts) -> None:
    """The manifests of the backups started in the period, and of the newest one before it
    (the exposure at the period's start is counted from it), with their key record sets."""
    # Labels sort by time, and so do their stamps: compare text, parse only what is read.
    start, end = _stamp(period.start), _stamp(period.end)
    labels = sorted(text for text in listing.manifests if _label_stamp(text) < end)
    before = [text for text in labels if _label_stamp(text) < start]
    wanted = [BackupLabel(t) for t in before[-1:] + labels[len(before) :]]
    # Reading and decrypting is mostly I/O and C (AES-GCM, zstd): threads overlap it.
    with ThreadPoolExecutor(max_workers=_READERS) as pool:
        loaded = list(pool.map(lambda label: _load(repo, listing, label), wanted))
    for label, outcome in zip(wanted, loaded, strict=True):
        if isinstance(outcome, str):
            facts.damaged[str(label)] = outcome
            continue
        manifest, key_set = outcome
        if key_set is not None:
            facts.key_sets.append(key_set)
        facts.backups.append(manifest)


_READERS = 8


def _load(
    repo: Repository, listing: _Listing, label: BackupLabel
) -> tuple[BackupFact, KeySetFact | None] | str:
    """One backup's facts and key set, or why its manifest cannot be read."""
    records = listing.key_records.get(str(label), [])
    try:
        dek, key_set = unwrap_newest(repo, "backup", str(label), records)
        manifest, _ = repo.load_manifest(label, dek)
    except (IntegrityError, WrongKey, ObjectNotFound) as exc:
        return exc.message
    fact = BackupFact(
        label=manifest.label,
        type=manifest.type,
        start=manifest.start_time,
        stop=manifest.stop_time,
        duration_s=manifest.stats.duration_s,
        size=manifest.stats.size,
        stored=manifest.stats.stored,
    )
    return fact, key_set


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%d-%H%M%S")


def _label_stamp(label: str) -> str:
    """When a backup started, as its label writes it (the last stamp of ``F_..D``/``F_..I``)."""
    return label.rpartition("_")[2][:15]


def _read_verify_runs(settings: Settings, listings: dict[str, _Listing]) -> list[VerifyFact]:
    """Every verification record of every reachable repository (``backup/<label>/verify/``)."""
    runs = []
    for name, listing in listings.items():
        repo = open_repository(settings, name)
        runs += [fact for key in listing.verify if (fact := _verify_fact(repo, key))]
    return runs


def _verify_fact(repo: Repository, key: str) -> VerifyFact | None:
    """The verification record at ``key``; None when it is not signed by the repository's
    signing key (a forged ``ok: true`` must not count as a verification)."""
    label, _, name = key[len(BACKUP_PREFIX) :].partition("/verify/")
    try:
        when = datetime.strptime(name.removesuffix(".json"), _STAMP).replace(tzinfo=UTC)
    except ValueError:
        when = BackupLabel(label).time
    try:
        record = json.loads(repo.storage.read_bytes(key))
    except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
    if not repo.auth.authentic_object(record, key):
        log.warning("verification record '%s' is not authentic; ignored", key)
        return None
    try:
        ok, damaged = record["ok"] is True, int(record.get("damaged_files", 0))
    except (KeyError, TypeError, ValueError):
        ok, damaged = False, 0  # a verification record that does not parse proves nothing
    return VerifyFact(repo.name, label, when, ok, damaged, key)


def _read_wal(settings: Settings, copies: CopyMap) -> list[WalFact]:
    """Each reachable repository's WAL (from the listing), and how far it is behind the primary
    (the first configured repository, where WAL is archived first; no lag without it)."""
    primary = settings.repo[0].name
    lag = {} if primary in copies.unreachable else copies.wal_lag(primary)
    found = []
    for name, keys in copies.wal.items():
        if name in copies.unreachable:
            continue
        segments = []
        for key in keys:
            try:
                wal = parse_wal_name(key.rsplit("/", 1)[-1])
            except ValueError:
                continue
            if wal.kind == "segment" and wal.key == key:
                segments.append((wal.timeline, wal.name))
        newest = max(segments)[1] if segments else None
        newest_at = None
        if newest is not None:
            try:
                newest_at = WalArchive(open_repository(settings, name)).pushed_at(newest)
            except DrkitError as exc:
                copies.unreachable[name] = exc.message
                continue
        found.append(WalFact(name, len(segments), newest, newest_at, lag.get(name)))
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
        record = read_event(repo, key)
        return FailureFact(job, when, int(record["exit_code"]), str(record["error"]), key)
    except (KeyError, TypeError, ValueError):
        return FailureFact(job, when, 2, "(the job record does not parse)", key)
    except IntegrityError:
        return FailureFact(job, when, 2, "(the job record does not authenticate)", key)
