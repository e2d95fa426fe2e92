"""Drill records in every repository: written there by the drill, caught up by `drkit replicate`.

A drill seals its record once (one data key, one key record) and writes the same bytes to every
configured repository, the way a backup's copies are the primary's bytes. A repository that cannot
take it is a warning, not a failure: the record is safe as long as one repository has it, and
replication copies it to the others later. Replication goes every way, not only from the primary:
the repository that missed a record may be the primary itself. Only a copy that authenticates is
spread, so a damaged record never replaces a missing one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime

from drkit.config.settings import Settings
from drkit.crypto.base import KeyProvider
from drkit.errors import DrillRecordNotWritten, DrkitError, DrkitWarning, IntegrityError
from drkit.repo.drills import DRILL_PREFIX, DrillRecord, drill_time, is_drill_id, seal_drill_record
from drkit.repo.open import open_key_provider, open_storage
from drkit.repo.repository import Repository
from drkit.repo.signer import copy_signer, first_signing


@dataclass
class DrillRecordCopies:
    """Where a drill's record went."""

    drill_id: str
    written: list[str] = field(default_factory=list)  # repositories that hold it now
    warnings: list[DrkitWarning] = field(default_factory=list)  # one per repository that does not

    @property
    def ok(self) -> bool:
        """At least one repository holds the record."""
        return bool(self.written)


def write_drill_record_everywhere(
    settings: Settings, record: DrillRecord, keys: KeyProvider | None = None
) -> DrillRecordCopies:
    """Seal ``record`` with a fresh data key from ``keys`` (default: the configured provider)
    and write it to every configured repository. Raises when no data key can be made (then no
    repository has it); a repository that fails is a DrillRecordNotWritten warning."""
    keys = keys or open_key_provider(settings.keys)
    repos: list[Repository] = []
    for repo_settings in settings.repo:
        with suppress(DrkitError):  # an unreachable one is reported below
            repos.append(Repository(open_storage(repo_settings), keys))
    signing = first_signing([repo.auth for repo in repos])
    sealed = seal_drill_record(record, keys, signing)
    copies = DrillRecordCopies(record.id)
    for repo_settings in settings.repo:
        try:
            repo = Repository(open_storage(repo_settings), keys)
            repo.check()
            copy_signer(signing.storage, repo.storage)
            repo.write_drill_record(sealed)
        except DrkitError as exc:
            copies.warnings.append(
                DrillRecordNotWritten(
                    f"drill record '{record.id}' was not written to repository"
                    f" '{repo_settings.name}': {exc.message}",
                    hint="'drkit replicate' copies it there once the repository takes writes",
                )
            )
        else:
            copies.written.append(repo_settings.name)
    return copies


@dataclass
class DrillRecordSync:
    """What catching the repositories up on drill records did."""

    copied: dict[str, list[str]] = field(default_factory=dict)  # repository -> ids copied to it
    errors: dict[str, str] = field(default_factory=dict)  # repository -> why it is not caught up


def sync_drill_records(
    repos: Sequence[Repository], keep_since: Mapping[str, datetime | None]
) -> DrillRecordSync:
    """Copy every drill record that authenticates somewhere to each repository lacking it,
    except records older than ``keep_since[repository]`` (its retention would prune them)."""
    sync = DrillRecordSync()
    present: dict[str, set[str]] = {}
    for repo in repos:
        try:
            present[repo.name] = set(repo.drill_ids())
        except DrkitError as exc:
            sync.errors[repo.name] = exc.message
    readable = [repo for repo in repos if repo.name in present]
    every_id = sorted({i for ids in present.values() for i in ids if is_drill_id(i)})
    sources: dict[str, Repository | None] = {}
    for target in readable:
        cutoff = keep_since.get(target.name)
        for drill_id in every_id:
            if drill_id in present[target.name] or (cutoff and drill_time(drill_id) < cutoff):
                continue
            if drill_id not in sources:
                sources[drill_id] = _authentic_copy(readable, present, drill_id)
            source = sources[drill_id]
            if source is None:
                continue  # no copy can be trusted: nothing to spread (drill list says so)
            try:
                _copy_record(source, target, drill_id)
            except DrkitError as exc:
                sync.errors[target.name] = exc.message
                break
            sync.copied.setdefault(target.name, []).append(drill_id)
    return sync


def _authentic_copy(
    repos: Sequence[Repository], present: Mapping[str, set[str]], drill_id: str
) -> Repository | None:
    for repo in repos:
        if drill_id in present[repo.name] and repo.drill_record(drill_id).authentic:
            return repo
    return None


def _copy_record(source: Repository, target: Repository, drill_id: str) -> None:
    """Copy one record's objects, key records first and the record last (as written), except
    those the target has already (an interrupted copy); each checked against the source."""
    copy_signer(source.storage, target.storage)  # what the record's key record is checked by
    objects = source.storage.list(f"{DRILL_PREFIX}{drill_id}/")
    have = {o.key: o.size for o in target.storage.list(f"{DRILL_PREFIX}{drill_id}/")}
    for obj in sorted(objects, key=lambda o: (o.key.endswith("/record"), o.key)):
        if have.get(obj.key) == obj.size:
            continue
        data = source.storage.read_bytes(obj.key)
        written = target.storage.write_bytes(obj.key, data)
        if written.sha256 != hashlib.sha256(data).hexdigest():
            with suppress(DrkitError):  # never leave a bad copy a later run would skip
                target.storage.delete(obj.key)
            raise IntegrityError(f"copy of '{obj.key}' to '{target.name}' differs from the source")
