"""Prometheus metrics, computed from the repositories themselves.

``drkit metrics --textfile`` (for node_exporter's textfile collector, from a timer or a CronJob)
and the scheduler's ``/metrics`` call the same ``collect()``, so both expose the same families
with the same meaning; the alert rules (deploy/prometheus/drkit-rules.yml) depend on these names.

Cost is bounded so a scrape stays under a second on large repositories: one listing per
repository (backups, verification records, WAL, job events; a posix repository's sizes come from
drkit/schedule/sizes.py, an lstat only per object not seen before), the manifests of the newest
backup of each type only, one ranged read of the newest WAL object's clear header, the newest
verification record, the newest drill record, and one query to the server for its current WAL
file. A value drkit cannot know (no backup yet, no drill yet, a repository it cannot list) has
no sample: alert on ``absent()`` for "never happened".
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from drkit.config.settings import Settings
from drkit.crypto.base import KeyProvider
from drkit.crypto.providers import open_provider
from drkit.errors import DrkitError
from drkit.info.copies import CopyMap
from drkit.pg.session import PgSession
from drkit.pg.wal import parse_segment_name
from drkit.repo.drills import DrillOutcome
from drkit.repo.events import EVENT_PREFIX, JobTimes, job_times
from drkit.repo.key_records import describe
from drkit.repo.label import BackupLabel
from drkit.repo.open import open_storage
from drkit.repo.repository import BACKUP_PREFIX, Repository
from drkit.repo.wal_archive import DEFAULT_SEGMENT_SIZE
from drkit.repo.wal_names import WAL_PREFIX, parse_wal_name
from drkit.repo.wal_objects import read_header
from drkit.schedule.sizes import SizeCache
from drkit.storage.posix import PosixStorage

log = logging.getLogger(__name__)
_SEGMENT = re.compile(r"[0-9A-F]{24}")

# name -> (help, label names). The alert rules and docs/monitoring.md use exactly these.
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "drkit_job_last_success_timestamp_seconds": (
        "when the job last succeeded (unix time)",
        ("job", "repo"),
    ),
    "drkit_job_last_failure_timestamp_seconds": ("when the job last failed", ("job", "repo")),
    "drkit_backup_last_duration_seconds": ("duration of the newest backup", ("type", "repo")),
    "drkit_backup_last_size_bytes": ("bytes stored by the newest backup", ("type", "repo")),
    "drkit_repository_size_bytes": ("bytes of every object in the repository", ("repo",)),
    "drkit_backup_newest_age_seconds": ("seconds since the newest backup ended", ("repo",)),
    "drkit_wal_archive_lag_seconds": (
        "seconds since the newest archived WAL file was pushed, when WAL is missing; 0 when"
        " the repository has every completed WAL file",
        ("repo",),
    ),
    "drkit_wal_archive_lag_segments": ("completed WAL files not in the repository", ("repo",)),
    "drkit_copies_321_compliant": ("1 when the newest backup passes 3-2-1", ()),
    "drkit_verify_last_ok": ("1 when the newest verification found no damage", ("repo",)),
    "drkit_verify_last_timestamp_seconds": ("when a backup was last verified", ("repo",)),
    "drkit_drill_last_ok": ("1 when the newest drill passed", ()),
    "drkit_drill_last_timestamp_seconds": ("when the newest drill finished", ()),
    "drkit_drill_rto_seconds": ("recovery time the newest drill achieved", ()),
    "drkit_drill_rto_target_seconds": ("recovery time objective", ()),
    "drkit_drill_rpo_seconds": ("recovery point the newest drill achieved", ()),
    "drkit_drill_rpo_target_seconds": ("recovery point objective", ()),
    "drkit_key_version": (
        "version of the key wrapping the newest backup's data key (1 for key files)",
        ("provider", "key"),
    ),
}


@dataclass
class Samples:
    """Collected values: family name -> label values -> value (one series per label set)."""

    values: dict[str, dict[tuple[str, ...], float]] = field(default_factory=dict)

    def add(self, name: str, value: float, *labels: str) -> None:
        """Set a series; a key version seen again (every repository holds copies wrapped by
        the same key) keeps the highest."""
        assert len(labels) == len(FAMILIES[name][1]), name
        series = self.values.setdefault(name, {})
        if name == "drkit_key_version" and labels in series:
            value = max(value, series[labels])
        series[labels] = value

    def families(self) -> Iterator[Metric]:
        for name, (help_text, label_names) in FAMILIES.items():
            family = GaugeMetricFamily(name, help_text, labels=list(label_names))
            for labels, value in self.values.get(name, {}).items():
                family.add_metric(list(labels), value)
            yield family


def collect(
    settings: Settings,
    job_overlay: dict[str, JobTimes] | None = None,
    keys: KeyProvider | None = None,
    sizes: SizeCache | None = None,
) -> Samples:
    """Every metric, read from the repositories (and the server's current WAL file).
    ``job_overlay``: job times the caller knows although they may not be recorded (the
    scheduler's own runs whose event record could not be written), for the primary repository.
    ``keys``: a provider the caller keeps open (the scheduler's); else one for this call only,
    which starts no Vault token renewer. ``sizes``: the object sizes known from earlier calls
    (the scheduler keeps one); else those kept in ``lock_path``."""
    samples = Samples()
    now = datetime.now(UTC)
    keys = keys or open_provider(settings.keys, one_shot=True)
    sizes = sizes or SizeCache(settings.lock_path)
    server_wal = _server_wal_file(settings)
    holdings: dict[str, set[str]] = {}
    primary_newest: str | None = None
    for index, repo_settings in enumerate(settings.repo):
        repo = Repository(open_storage(repo_settings), keys)
        try:
            labels, jobs = _collect_repository(samples, repo, now, server_wal, sizes)
        except DrkitError as exc:  # unreachable: no samples (readiness reports it)
            log.warning(
                "repository not read for metrics", extra={"repo": repo.name, "error": str(exc)}
            )
            labels, jobs = [], {}
        holdings[repo.name] = set(labels)
        if index == 0:
            primary_newest = labels[-1] if labels else None
            for job, times in (job_overlay or {}).items():
                merged = jobs.setdefault(job, JobTimes())
                for ok, at in ((True, times.last_ok), (False, times.last_fail)):
                    if at is not None:
                        merged.add(ok, at)
        _job_samples(samples, repo.name, jobs)
    if primary_newest is not None:
        status = CopyMap(holdings=holdings).status(settings, primary_newest)
        samples.add("drkit_copies_321_compliant", 1.0 if status.passes else 0.0)
    _drill_samples(samples, settings, keys)
    return samples


def _collect_repository(
    samples: Samples, repo: Repository, now: datetime, server_wal: str | None, sizes: SizeCache
) -> tuple[list[str], dict[str, JobTimes]]:
    """This repository's samples but the jobs'; returns its complete backups' labels (oldest
    first) and the job times its events record."""
    if isinstance(repo.storage, PosixStorage):  # an S3 listing has the sizes anyway
        listing, total = sizes.listing(repo.storage)
    else:
        objects = repo.storage.list("")
        listing, total = [o.key for o in objects], sum(o.size for o in objects)
    samples.add("drkit_repository_size_bytes", float(total), repo.name)
    kinds: dict[str, set[str]] = {}
    verifications: list[str] = []
    wal: list[str] = []
    events: list[str] = []
    for key in listing:
        if key.startswith(BACKUP_PREFIX):
            parts = key.split("/")
            if len(parts) >= 3 and BackupLabel.is_label(parts[1]):
                kinds.setdefault(parts[1], set()).add(parts[2])
                if parts[2] == "verify":
                    verifications.append(key)
        elif key.startswith(WAL_PREFIX):
            wal.append(key)
        elif key.startswith(EVENT_PREFIX):
            events.append(key)
    labels = sorted(label for label, found in kinds.items() if "manifest" in found)

    # The newest backup of each type; the newest of all gives the age and the key version
    segment_size = DEFAULT_SEGMENT_SIZE
    newest: dict[str, str] = {str(BackupLabel(label).type): label for label in labels}
    for kind, label in sorted(newest.items(), key=lambda item: item[1]):
        manifest, _ = repo.load_manifest(BackupLabel(label))
        samples.add(
            "drkit_backup_last_duration_seconds", manifest.stats.duration_s, kind, repo.name
        )
        samples.add("drkit_backup_last_size_bytes", float(manifest.stats.stored), kind, repo.name)
        if label == labels[-1]:
            age = (now - manifest.stop_time).total_seconds()
            samples.add("drkit_backup_newest_age_seconds", max(0.0, age), repo.name)
            segment_size = manifest.wal_segment_size
            _key_version(samples, repo, BackupLabel(label))

    _verify_samples(samples, repo, verifications)
    _wal_lag(samples, repo, wal, server_wal, segment_size, now)
    return labels, job_times(events)


def _job_samples(samples: Samples, repo: str, times: dict[str, JobTimes]) -> None:
    for job, t in sorted(times.items()):
        if t.last_ok is not None:
            samples.add(
                "drkit_job_last_success_timestamp_seconds", t.last_ok.timestamp(), job, repo
            )
        if t.last_fail is not None:
            samples.add(
                "drkit_job_last_failure_timestamp_seconds", t.last_fail.timestamp(), job, repo
            )


def _key_version(samples: Samples, repo: Repository, label: BackupLabel) -> None:
    records = sorted(o.key for o in repo.storage.list(f"{BACKUP_PREFIX}{label}/key/"))
    if not records:
        return
    try:
        named = describe(json.loads(repo.storage.read_bytes(records[-1])))
    except (ValueError, DrkitError):
        return
    samples.add("drkit_key_version", float(named.version or 1), named.provider, named.key)


def _verify_samples(samples: Samples, repo: Repository, keys: list[str]) -> None:
    """The newest authentic verification record of any backup (record names are their UTC
    time); records not signed by the repository's signing key are passed over."""
    for newest in sorted(keys, key=lambda k: k.rsplit("/", 1)[-1], reverse=True):
        try:
            record = json.loads(repo.storage.read_bytes(newest))
            at = datetime.fromisoformat(record["time"])
        except (ValueError, KeyError, TypeError, DrkitError):
            continue
        if repo.auth.authentic_object(record, newest):
            break
    else:
        return
    samples.add("drkit_verify_last_ok", 1.0 if record.get("ok") is True else 0.0, repo.name)
    samples.add("drkit_verify_last_timestamp_seconds", at.timestamp(), repo.name)


def _wal_lag(
    samples: Samples,
    repo: Repository,
    keys: list[str],
    server_wal: str | None,
    segment_size: int,
    now: datetime,
) -> None:
    """Completed WAL files behind the server's current one (not complete, so never archived
    yet), and for how long: since the newest archived file was pushed."""
    # Keys come sorted, and a segment name sorts by timeline, then position: the newest segment
    # is the last key that is one (found without looking at the other 100,000)
    newest = next(
        (name for key in reversed(keys) if _SEGMENT.fullmatch(name := key.rsplit("/", 1)[-1])),
        None,
    )
    if newest is None or server_wal is None:
        return
    _, archived = parse_segment_name(newest, segment_size)
    _, current = parse_segment_name(server_wal, segment_size)
    behind = max(0, current - archived - 1)
    samples.add("drkit_wal_archive_lag_segments", float(behind), repo.name)
    seconds = 0.0
    if behind:
        try:
            pushed = read_header(repo, parse_wal_name(newest)).pushed_at
            seconds = max(0.0, (now - pushed).total_seconds())
        except DrkitError:
            seconds = math.inf
    samples.add("drkit_wal_archive_lag_seconds", seconds, repo.name)


def _drill_samples(samples: Samples, settings: Settings, keys: KeyProvider) -> None:
    samples.add("drkit_drill_rto_target_seconds", settings.drill.rto.total_seconds())
    samples.add("drkit_drill_rpo_target_seconds", settings.drill.rpo.total_seconds())
    for repo_settings in settings.repo:  # the first repository that can be read
        try:
            entry = Repository(open_storage(repo_settings), keys).last_drill()
        except DrkitError:
            continue
        if entry is None or entry.record is None:
            return
        record = entry.record
        samples.add("drkit_drill_last_ok", 1.0 if record.outcome == DrillOutcome.PASS else 0.0)
        samples.add("drkit_drill_last_timestamp_seconds", record.finished_at.timestamp())
        if record.rto.achieved_seconds is not None:
            samples.add("drkit_drill_rto_seconds", record.rto.achieved_seconds)
        if record.rpo.achieved_seconds is not None:
            samples.add("drkit_drill_rpo_seconds", record.rpo.achieved_seconds)
        return


def _server_wal_file(settings: Settings) -> str | None:
    """The WAL file the server writes now; None when it cannot be reached (lag unknown)."""
    try:
        with PgSession(settings.postgres) as session:
            return session.current_wal_file()
    except DrkitError as exc:
        log.info("server not reachable for WAL lag", extra={"error": str(exc)})
        return None


class SamplesCollector(Collector):
    """A prometheus-client collector that yields already collected samples."""

    def __init__(self, samples: Samples) -> None:
        self.samples = samples

    def collect(self) -> Iterable[Metric]:
        return self.samples.families()


def exposition(samples: Samples) -> bytes:
    """The samples in Prometheus' text format, from a registry of their own."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SamplesCollector(samples))
    return generate_latest(registry)


def write_textfile(path: Path, samples: Samples) -> None:
    """Write the exposition to ``path`` atomically: a temporary file in the same directory,
    then a rename, so node_exporter never reads half a file."""
    data = exposition(samples)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, 0o644)  # node_exporter runs as another user; metrics hold no secrets
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
