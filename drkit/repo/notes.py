"""Drill notes: findings with their actions, and quarterly sign-offs, as the repository keeps them.

``drkit drill note`` and ``drkit drill signoff`` write one record each into every writable
repository under ``notes/<id>/`` — sealed and stored exactly like a drill record (a fresh data key
wrapped by the key provider in ``key/0001.json``, the record sealed with it and bound to its id in
``record``, written last), so a note cannot be altered or moved to another id unnoticed, and a
report made from the offsite copy shows the same notes as one made from the primary. Notes are
never rewritten: a corrected finding is a new note.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from drkit.codec.frame_reader import unseal
from drkit.codec.frame_writer import seal
from drkit.crypto.base import KeyProvider
from drkit.errors import IntegrityError, ObjectExists, ObjectNotFound, WrongKey
from drkit.repo.drills import SealedDrillRecord, is_drill_id, new_drill_id
from drkit.repo.repository import Repository
from drkit.repo.signer import RecordAuth

NOTE_PREFIX = "notes/"
new_note_id = new_drill_id  # the same sortable, host-unique form: 20261207-131500Z-3f9a
is_note_id = is_drill_id


class _Note(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str
    written_at: datetime
    written_by: str  # "user:<login>"
    host: str


class Finding(_Note):
    """What a drill showed that needs doing, who does it."""

    type: Literal["finding"] = "finding"
    drill: str  # the drill id the finding is about
    finding: str
    action: str = ""
    owner: str = ""


class Signoff(_Note):
    """A person's statement that a period's drills were reviewed."""

    type: Literal["signoff"] = "signoff"
    period: str  # "2026Q4", or "2026-10-01..2026-12-31"
    by: str
    statement: str = ""


Note = Annotated[Finding | Signoff, Field(discriminator="type")]


class _Envelope(BaseModel):
    note: Note


def note_context(note_id: str) -> bytes:
    """Binds a sealed note to its id: a note moved under another id fails authentication."""
    return f"note:{note_id}".encode()


def seal_note(note: Finding | Signoff, keys: KeyProvider, auth: RecordAuth) -> SealedDrillRecord:
    """Seal ``note`` with a fresh data key from ``keys``, its key record signed by ``auth`` (the
    same bytes go to every repository)."""
    if not is_note_id(note.id):
        raise ValueError(f"'{note.id}' is not a note id (new_note_id() makes them)")
    data_key = keys.new_data_key()
    signed = auth.sign_key_record(data_key.record, data_key.plaintext, "note", note.id)
    key_record = json.dumps(signed, sort_keys=True, indent=2).encode()
    plain = _Envelope(note=note).model_dump_json().encode()
    return SealedDrillRecord(
        note.id, key_record, seal(plain, data_key.plaintext, note_context(note.id))
    )


def write_note(repo: Repository, sealed: SealedDrillRecord) -> None:
    """Store a sealed note: key record first, the note last. Write-once (ObjectExists)."""
    if repo.storage.list(f"{NOTE_PREFIX}{sealed.id}/"):
        raise ObjectExists(
            f"note '{sealed.id}' already exists in repository '{repo.name}'",
            hint="a note is written once; write a new one to correct it",
        )
    repo.storage.write_bytes(f"{NOTE_PREFIX}{sealed.id}/key/0001.json", sealed.key_record)
    repo.storage.write_bytes(f"{NOTE_PREFIX}{sealed.id}/record", sealed.sealed)


class NoteEntry(BaseModel):
    """One note as a repository holds it: the note, or why it cannot be trusted."""

    model_config = ConfigDict(frozen=True)

    id: str
    note: Note | None = None
    error: str | None = None


def note_ids(repo: Repository) -> list[str]:
    """Ids under ``notes/`` that hold a written note, oldest first."""
    ids = set()
    for obj in repo.storage.list(NOTE_PREFIX):
        parts = obj.key.split("/")
        if len(parts) == 3 and parts[2] == "record":
            ids.add(parts[1])
    return sorted(ids)


def read_note(repo: Repository, note_id: str) -> NoteEntry:
    """The note stored under ``note_id``, or why it fails (damaged, moved, another key)."""
    if not is_note_id(note_id):
        return NoteEntry(id=note_id, error=f"'{note_id}' is not a note id")
    try:
        dek = repo.record_dek(f"{NOTE_PREFIX}{note_id}/key/", "note", note_id)
        sealed = repo.storage.read_bytes(f"{NOTE_PREFIX}{note_id}/record")
        try:
            plain = unseal(sealed, dek, note_context(note_id))
        except IntegrityError as exc:
            raise IntegrityError(f"note '{note_id}' fails authentication: {exc}") from None
        try:
            note = _Envelope.model_validate_json(plain).note
        except ValidationError as exc:
            raise IntegrityError(f"note '{note_id}' does not parse: {exc}") from None
        if note.id != note_id:
            raise IntegrityError(f"note '{note_id}' names another note '{note.id}'")
        return NoteEntry(id=note_id, note=note)
    except (IntegrityError, WrongKey, ObjectNotFound) as exc:
        return NoteEntry(id=note_id, error=exc.message)


def read_notes(repo: Repository) -> list[NoteEntry]:
    """Every note, oldest first; one that fails authentication is listed with its error."""
    return [read_note(repo, note_id) for note_id in note_ids(repo)]
