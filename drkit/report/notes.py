"""drkit drill note / signoff: findings, actions and sign-offs, written into every repository.

A note is sealed once (``repo.notes.seal_note``) and the same bytes are written into each
configured repository, like a drill record, so the report made from any surviving copy shows
it. A repository that cannot take it is a warning; the note is refused only when none can.
"""

from __future__ import annotations

import getpass
import socket
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from drkit.config.settings import Settings
from drkit.errors import DrillNotFound, DrkitError, DrkitWarning, RepositoryError
from drkit.repo.notes import Finding, Signoff, new_note_id, seal_note, write_note
from drkit.repo.open import open_key_provider, open_repository, open_storage
from drkit.repo.repository import Repository
from drkit.repo.signer import copy_signer, first_signing
from drkit.report.period import days, quarter
from drkit.result import OperationResult


@dataclass(kw_only=True)
class NoteResult(OperationResult):
    note: Finding | Signoff
    written: list[str] = field(default_factory=list)  # repositories that hold it

    def _data(self) -> dict[str, Any]:
        return {"note": self.note.model_dump(mode="json"), "written": self.written}


def add_finding(
    settings: Settings,
    drill: str,
    finding: str,
    action: str = "",
    owner: str = "",
    now: datetime | None = None,
) -> NoteResult:
    """Record a finding about ``drill`` (which a repository must hold a record of)."""
    _require_drill(settings, drill)
    now = now or datetime.now(UTC)
    note = Finding(
        id=new_note_id(now),
        written_at=now,
        written_by=_who(),
        host=socket.gethostname(),
        drill=drill,
        finding=finding,
        action=action,
        owner=owner,
    )
    return _write_everywhere(settings, note)


def add_signoff(
    settings: Settings, period: str, by: str, statement: str = "", now: datetime | None = None
) -> NoteResult:
    """Record that ``by`` reviewed and signed off the report of ``period`` ('2026Q4' or
    '2026-10-01..2026-12-31')."""
    now = now or datetime.now(UTC)
    note = Signoff(
        id=new_note_id(now),
        written_at=now,
        written_by=_who(),
        host=socket.gethostname(),
        period=period_label(period),
        by=by,
        statement=statement,
    )
    return _write_everywhere(settings, note)


def period_label(text: str) -> str:
    """The canonical label of a period as ``drkit report`` names it; ValueError if malformed."""
    if ".." in text:
        first, _, last = text.partition("..")
        return days(datetime.fromisoformat(first).date(), datetime.fromisoformat(last).date()).label
    return quarter(text).label


def _require_drill(settings: Settings, drill: str) -> None:
    errors = []
    for repo_settings in settings.repo:
        try:
            repo = open_repository(settings, repo_settings.name)
            if drill in repo.drill_ids():
                entry = repo.drill_record(drill)
                if entry.authentic:
                    return
                errors.append(f"'{repo_settings.name}': {entry.error}")
        except DrkitError as exc:
            errors.append(f"'{repo_settings.name}': {exc.message}")
    raise DrillNotFound(
        f"no repository holds a readable record of drill '{drill}'"
        + (f" ({'; '.join(errors)})" if errors else ""),
        hint="'drkit drill list' shows the drill ids",
    )


def _write_everywhere(settings: Settings, note: Finding | Signoff) -> NoteResult:
    keys = open_key_provider(settings.keys)
    repos: list[Repository] = []
    for repo_settings in settings.repo:
        with suppress(DrkitError):  # an unreachable one is reported below
            repos.append(Repository(open_storage(repo_settings), keys))
    signing = first_signing([repo.auth for repo in repos])
    sealed = seal_note(note, keys, signing)
    result = NoteResult(note=note)
    for repo_settings in settings.repo:
        try:
            repo = open_repository(settings, repo_settings.name)
            repo.check()
            copy_signer(signing.storage, repo.storage)
            write_note(repo, sealed)
        except DrkitError as exc:
            result.warnings.append(
                DrkitWarning(
                    f"note '{note.id}' not written to repository '{repo_settings.name}':"
                    f" {exc.message}"
                )
            )
            continue
        result.written.append(repo_settings.name)
    if not result.written:
        raise RepositoryError(
            f"note '{note.id}' could not be written to any repository: "
            + "; ".join(w.message for w in result.warnings)
        )
    return result


def _who() -> str:
    try:
        return f"user:{getpass.getuser()}"
    except (KeyError, OSError):
        return "user:unknown"
