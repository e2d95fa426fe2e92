"""The key record sets a report shows: which key version wraps each backup, WAL key period,
drill record and note of the period, and of the backup and WAL period in effect when it began.

Only these are read (not every set of the repository): a version none of them uses is not in use
in the period, and one no set before the period used was rotated in during it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from drkit.errors import DrkitError, IntegrityError
from drkit.repo.drills import DRILL_PREFIX, drill_time, is_drill_id
from drkit.repo.key_records import describe
from drkit.repo.notes import NOTE_PREFIX
from drkit.repo.repository import Repository
from drkit.repo.wal_objects import KEYS_PREFIX
from drkit.report.period import Period


@dataclass(frozen=True)
class KeySetFact:
    kind: str  # backup | wal | drill | note
    name: str  # label, WAL key period, drill or note id
    provider: str
    key: str
    version: int | None
    escrowed: bool


def unwrap_newest(
    repo: Repository, kind: str, name: str, records: list[str]
) -> tuple[bytes, KeySetFact | None]:
    """The DEK of the newest of ``records`` (object keys, oldest first) that unwraps, and the
    key that wraps it; raises the last error when none does."""
    if not records:
        raise IntegrityError(f"{kind} '{name}' has no key record in repository '{repo.name}'")
    error: DrkitError | None = None
    for key in reversed(records):
        try:
            record = json.loads(repo.storage.read_bytes(key))
            dek = repo.keys.unwrap(record)
            repo.auth.check_key_record(record, dek, kind, name, key)
            return dek, _fact(kind, name, record)
        except json.JSONDecodeError:
            error = IntegrityError(f"key record '{key}' is not valid JSON")
        except DrkitError as exc:
            error = exc
    assert error is not None
    raise error


def key_sets(repo: Repository, period: Period, holders: dict[str, Repository]) -> list[KeySetFact]:
    """The sets of WAL key periods (from ``repo``; the one in effect when the period began
    too), and of the drill records and notes of ``period`` (from the repository each was read
    from, ``holders``); backups' sets come with their manifests."""
    wal = _wal_records(repo)
    times = {name: _wal_time(name) for name in wal}
    earlier = [n for n, t in times.items() if t is not None and t < period.start]
    wanted = sorted(earlier)[-1:] + [n for n, t in times.items() if t is not None and t in period]
    sets = [("wal", n, repo, wal[n]) for n in sorted(wanted)]
    for name, holder in sorted(holders.items()):
        if is_drill_id(name) and drill_time(name) in period:
            for kind, prefix in (("drill", DRILL_PREFIX), ("note", NOTE_PREFIX)):
                records = [o.key for o in holder.storage.list(f"{prefix}{name}/key/")]
                if records:
                    sets.append((kind, name, holder, records))
    found = []
    for kind, name, holder, records in sets:
        newest = _newest(holder, records)
        if newest is not None and (fact := _fact(kind, name, newest)) is not None:
            found.append(fact)
    return found


def _wal_records(repo: Repository) -> dict[str, list[str]]:
    """Key record object keys by WAL key period (``wal-keys/<period>/<n>.json``)."""
    found: dict[str, list[str]] = {}
    for obj in repo.storage.list(KEYS_PREFIX):
        parts = obj.key[len(KEYS_PREFIX) :].split("/")
        if len(parts) == 2 and parts[-1].endswith(".json"):
            found.setdefault(parts[0], []).append(obj.key)
    return found


def _newest(repo: Repository, records: list[str]) -> dict[str, object] | None:
    for key in sorted(records, reverse=True):
        try:
            record = json.loads(repo.storage.read_bytes(key))
        except (json.JSONDecodeError, UnicodeDecodeError, DrkitError):
            continue
        if isinstance(record, dict):
            return record
    return None


def _fact(kind: str, name: str, record: dict[str, object]) -> KeySetFact | None:
    try:
        key = describe(record)
    except IntegrityError:
        return None
    return KeySetFact(kind, name, key.provider, key.key, key.version, "escrow" in record)


def _wal_time(name: str) -> datetime | None:
    if not (name.isdigit() and len(name) in (8, 10)):
        return None
    return datetime.strptime(name.ljust(10, "0"), "%Y%m%d%H").replace(tzinfo=UTC)
