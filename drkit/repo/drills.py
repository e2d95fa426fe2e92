"""Drill records: what a restore drill did and achieved, as the repository keeps it.

A drill writes one record into every writable repository under ``drills/<id>/`` (write-once,
encrypted and authenticated like a manifest: a fresh data key wrapped by the key provider in
``key/0001.json``, the record sealed with it in ``record``). Reports and ``drkit drill list`` read
them back from any one repository, so the history survives the loss of the primary site.

This module is the record's schema: the drill operation fills it, the repository stores it, the
report and the metrics read it. Adding a field with a default keeps old records readable; changing
the meaning of one needs a new ``version``.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from drkit.codec.frame_reader import unseal
from drkit.codec.frame_writer import seal
from drkit.crypto.base import KeyProvider
from drkit.errors import IntegrityError
from drkit.repo.signer import RecordAuth

DRILL_PREFIX = "drills/"
RECORD_VERSION = 1
_DRILL_ID = re.compile(r"^\d{8}-\d{6}Z-[0-9a-f]{4}$")


class DrillKind(StrEnum):
    RESTORE_TEST = "restore-test"  # the routine check: newest backup + archive, default checks
    PARTIAL = "partial"  # a scenario exercising part of the DR plan
    FULL = "full"  # the whole DR plan: scenario, runbook, application switch-over recorded


class DrillOutcome(StrEnum):
    PASS = "PASS"  # noqa: S105 - a drill outcome, not a password
    FAIL = "FAIL"


class FailureKind(StrEnum):
    RESTORE_FAILED = "restore-failed"  # no usable copy: restore, WAL replay or start failed
    CHECK_FAILED = "check-failed"  # the copy came up but a check failed
    TARGET_MISSED = "target-missed"  # everything worked, but RTO or RPO exceeded its target


def new_drill_id(now: datetime | None = None) -> str:
    """Sortable by time and unique across hosts: ``20261207-131500Z-3f9a``."""
    now = now or datetime.now(UTC)
    return now.strftime("%Y%m%d-%H%M%SZ") + "-" + secrets.token_hex(2)


def is_drill_id(value: str) -> bool:
    return bool(_DRILL_ID.match(value))


def drill_time(drill_id: str) -> datetime:
    """When the drill started, from its id (UTC, to the second)."""
    return datetime.strptime(drill_id[:16], "%Y%m%d-%H%M%SZ").replace(tzinfo=UTC)


def drill_key_record_key(drill_id: str) -> str:
    return f"{DRILL_PREFIX}{drill_id}/key/0001.json"


def drill_record_key(drill_id: str) -> str:
    return f"{DRILL_PREFIX}{drill_id}/record"


def drill_context(drill_id: str) -> bytes:
    """Binds a sealed record to its id: a record moved under another id fails authentication."""
    return f"drill:{drill_id}".encode()


class _Record(BaseModel):
    # built on first use: every command opening a repository imports these, few read a record
    model_config = ConfigDict(extra="ignore", frozen=True, defer_build=True)


class Phase(_Record):
    """One timed step on the wall clock: plan, restore, wal-replay, start, checks, teardown."""

    name: str
    seconds: float
    detail: str = ""


class RestorePoint(_Record):
    backup: str  # the label restored
    target_kind: str = "immediate"  # immediate | latest | time | lsn | xid | name
    target_value: str = ""
    reason: str = ""  # why this point: "newest backup", "random", "requested", "scenario ..."
    time: datetime | None = None  # the random instant drawn (--random), which target_value reaches


class Objective(_Record):
    """A target next to what was achieved; ``met`` is None when nothing could be measured."""

    target_seconds: float | None = None
    achieved_seconds: float | None = None
    met: bool | None = None


class RpoDetail(_Record):
    method: str = ""  # "heartbeat" | "last-commit" | "none"
    disaster_time: datetime | None = None  # the instant losses are counted from
    recovered_time: datetime | None = None  # newest commit (or heartbeat) in the restored copy
    recovered_lsn: str | None = None
    source_lsn: str | None = None  # the source's current LSN, when it was reachable
    lost_bytes: int | None = None  # source_lsn - recovered_lsn


class Exposure(_Record):
    """A repository's state when the drill ran: how much would be lost if the site died now."""

    repo: str
    newest_backup: str | None = None
    newest_backup_age_seconds: float | None = None
    newest_wal: str | None = None
    newest_wal_age_seconds: float | None = None
    error: str | None = None  # why the repository could not be read (nothing above is known)


class CheckResult(_Record):
    name: str
    kind: str  # amcheck | sql | heartbeat | readable | pgbench
    ok: bool
    seconds: float = 0.0
    detail: str = ""
    value: float | None = None  # the figure measured, when the check has one (pgbench: tps)


class DrillRecord(_Record):
    version: int = RECORD_VERSION
    id: str
    kind: DrillKind = DrillKind.RESTORE_TEST
    scenario: str | None = None  # scenario name (None: the configured restore test)
    scenario_digest: str | None = None  # sha256 of the scenario file as run
    started_at: datetime
    finished_at: datetime
    started_by: str  # "scheduler" or "user:<login>"
    host: str
    drkit_version: str
    pg_version: str | None = None  # server_version of the restored copy
    system_identifier: int | None = None
    repository: str | None = None  # the repository the backup was restored from
    repositories_allowed: list[str] = Field(default_factory=list)
    restore_point: RestorePoint | None = None
    phases: list[Phase] = Field(default_factory=list)
    rto: Objective = Objective()
    rpo: Objective = Objective()
    rpo_detail: RpoDetail = RpoDetail()
    exposure: list[Exposure] = Field(default_factory=list)
    checks: list[CheckResult] = Field(default_factory=list)
    restored_bytes: int = 0
    wal_segments: int = 0  # WAL segments fetched from the archive during recovery
    predicted_seconds: float | None = None  # `restore --plan`'s prediction, for comparison
    outcome: DrillOutcome
    failure: FailureKind | None = None
    reason: str = ""  # one line: why it failed (empty on PASS)


@dataclass(frozen=True)
class SealedDrillRecord:
    """A record as stored: its key record and its sealed bytes, the same in every repository
    (like a backup's copies, which are the primary's bytes)."""

    id: str
    key_record: bytes  # JSON: the record's DEK wrapped by the key provider (escrow included)
    sealed: bytes  # the record's JSON sealed with that DEK, bound to ``id``


def seal_drill_record(
    record: DrillRecord, keys: KeyProvider, auth: RecordAuth
) -> SealedDrillRecord:
    """Seal ``record`` with a fresh data key from ``keys``, its key record signed by ``auth``."""
    if not is_drill_id(record.id):
        raise ValueError(f"'{record.id}' is not a drill id (new_drill_id() makes them)")
    data_key = keys.new_data_key()
    signed = auth.sign_key_record(data_key.record, data_key.plaintext, "drill", record.id)
    key_record = json.dumps(signed, sort_keys=True, indent=2).encode()
    sealed = seal(record.model_dump_json().encode(), data_key.plaintext, drill_context(record.id))
    return SealedDrillRecord(record.id, key_record, sealed)


def unseal_drill_record(drill_id: str, sealed: bytes, dek: bytes) -> DrillRecord:
    """The record stored under ``drill_id``; IntegrityError when it fails authentication (damage,
    another key, a record moved from another id) or does not parse."""
    try:
        plain = unseal(sealed, dek, drill_context(drill_id))
    except IntegrityError as exc:
        raise IntegrityError(f"drill record '{drill_id}' fails authentication: {exc}") from None
    try:
        record = DrillRecord.model_validate_json(plain)
    except ValidationError as exc:
        raise IntegrityError(f"drill record '{drill_id}' does not parse: {exc}") from None
    if record.id != drill_id:  # authenticated, so only a writer with the key could do this
        raise IntegrityError(f"drill record '{drill_id}' names another drill '{record.id}'")
    return record


@dataclass(frozen=True)
class DrillEntry:
    """One drill record as a repository holds it: the record, or why it could not be read."""

    id: str
    record: DrillRecord | None = None
    error: str | None = None  # fails authentication, does not parse, key record missing, ...

    @property
    def authentic(self) -> bool:
        return self.record is not None
