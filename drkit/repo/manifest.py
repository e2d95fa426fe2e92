"""The manifest: the restore contract of one backup.

It lists every file with its metadata, plaintext checksum and where its bytes live (object,
offset and length of its frame), every directory and symlink, the tablespaces, the WAL range, the
PostgreSQL identity and the data objects with their stored checksums. It is stored encrypted and
authenticated like data (a frame bound to the backup's label) and it is written last: a backup
exists exactly when its manifest does.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_FORMAT = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Model):
    """One file of the backup and where its bytes live.

    Three kinds: a *whole* entry (``pages`` is None) whose frame holds the whole file; a *delta*
    entry (``pages`` set) whose frame holds only the listed pages, every other page coming from
    the same path in backup ``base``; and a *reference* (``backup`` set): the file did not change,
    its frame (whole or delta) is the one stored by backup ``backup``.
    """

    path: str  # PGDATA-relative, '/' separated
    size: int
    mode: int
    mtime: float
    # Of the whole file's plaintext; None for a delta read from WAL summaries, which never read
    # the whole file (its pages are checked by frame_sha256 and the frame's authentication).
    sha256: str | None
    object: str  # repository key of the object holding the frame
    offset: int  # of the frame inside the object
    length: int  # stored length of the frame
    backup: str | None = None  # label of the backup that stored the frame; None: this one
    pages: list[tuple[int, int]] | None = None  # delta: [start, end) block ranges in the frame
    base: str | None = None  # delta: backup holding the older version of this file
    frame_sha256: str | None = None  # delta: sha256 of the frame's plaintext (the pages)
    # delta: its pages are stored XORed with base's version of each (zeros past base's end)
    xor: bool = False
    # A large frame: its payload is one zstd frame per chunk, each restorable on its own:
    # (offset in the frame's plaintext — for a whole entry, in the file; for a delta, in its
    # concatenated pages —, offset in the frame's payload, sha256 of the chunk's plaintext)
    chunks: list[tuple[int, int, str]] | None = None
    bad_pages: list[int] = Field(default_factory=list)  # page checksum failures found at backup

    def owner(self, label: str) -> str:
        """The backup whose key and context decode this entry's frame (``label`` holds it)."""
        return self.backup or label

    @property
    def payload_size(self) -> int:
        """Plaintext bytes in the frame."""
        if self.pages is None:
            return self.size
        total = sum(end - start for start, end in self.pages) * 8192
        if self.pages and self.pages[-1][1] * 8192 > self.size:
            total -= self.pages[-1][1] * 8192 - self.size  # a trailing partial page
        return total

    @property
    def payload_sha256(self) -> str:
        payload = self.frame_sha256 if self.pages is not None and self.frame_sha256 else self.sha256
        assert payload is not None  # a whole entry has sha256, a delta frame_sha256
        return payload


class DirEntry(_Model):
    path: str
    mode: int


class LinkEntry(_Model):
    path: str
    target: str


class TablespaceEntry(_Model):
    oid: int
    name: str
    location: str


class ObjectEntry(_Model):
    key: str
    size: int
    sha256: str  # of the stored (encrypted) bytes, so copies can be checked without the key


# BackupStats.changes, as the CLI says it
CHANGES_FROM = {
    "summaries": "the server's WAL summaries",
    "wal": "reading the WAL",
    "scan": "scanning changed files",
}


class BackupStats(_Model):
    files: int
    size: int  # plaintext bytes
    stored: int  # bytes in the repository
    duration_s: float
    # diff/incr: where the changed blocks came from: "summaries" (the server's WAL summaries),
    # "wal" (drkit read the WAL), "scan" (changed relation files read whole); None for a full
    changes: str | None = None


class Manifest(_Model):
    format: int = MANIFEST_FORMAT
    label: str
    type: str
    parent: str | None = None
    drkit_version: str
    start_time: datetime
    stop_time: datetime
    start_lsn: str
    stop_lsn: str
    stop_next_xid: int | None = None  # XIDs from here on started after the backup ended
    timeline: int
    start_wal: str
    stop_wal: str
    pg_version_num: int
    system_identifier: str
    wal_segment_size: int
    data_checksums: bool
    chain: list[str] = Field(default_factory=list)  # labels this backup needs, full first
    key_record: str  # repository key of the key record that wraps this backup's DEK
    owner: str  # user and group that owned PGDATA, restored when drkit runs as root
    group: str
    tablespaces: list[TablespaceEntry]
    directories: list[DirEntry]
    links: list[LinkEntry]
    files: list[FileEntry]
    objects: list[ObjectEntry]
    stats: BackupStats

    @property
    def pg_major(self) -> int:
        return self.pg_version_num // 10000
