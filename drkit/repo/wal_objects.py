"""The archived WAL object: header, key periods and their DEKs, encoding and decoding.

See the package docstring (drkit/wal/__init__.py) for the format. Everything here streams: an
object is written as the file is read and decoded as it is read back, in bounded memory.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO, Protocol

from drkit.codec.frame import FrameInfo
from drkit.codec.frame_reader import decode_frame
from drkit.codec.frame_writer import FrameWriter
from drkit.crypto.base import KeyProvider
from drkit.errors import DrkitError, IntegrityError, ObjectExists
from drkit.repo.identity import check_identity
from drkit.repo.signer import RecordAuth
from drkit.repo.wal_names import KeyPeriod, WalName
from drkit.storage.base import Storage, WrittenObject

MAGIC = b"DKW1"
VERSION = 1
KEYS_PREFIX = "wal-keys/"
_PREFIX = struct.Struct(">4sBB")  # magic, version, len(period)
_PUSHED_AT = struct.Struct(">Q")
MAX_HEADER_SIZE = _PREFIX.size + 255 + _PUSHED_AT.size
READ_CHUNK = 1024 * 1024

__all__ = ["KeyPeriod"]  # re-exported: defined in names, a light module
_PERIOD_FORMATS = {"daily": "%Y%m%d", "hourly": "%Y%m%d%H"}


class Readable(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


class RepoLike(Protocol):
    """What the WAL code needs of a repository; ``drkit.repo.repository.Repository`` is one."""

    @property
    def name(self) -> str: ...

    @property
    def storage(self) -> Storage: ...

    @property
    def keys(self) -> KeyProvider: ...


@dataclass(frozen=True)
class WalHeader:
    """The clear-text header of an archived WAL object (trusted only once the frame decoded)."""

    period: str
    pushed_at_ms: int
    size: int  # bytes the header occupies; the frame follows

    @property
    def pushed_at(self) -> datetime:
        return datetime.fromtimestamp(self.pushed_at_ms / 1000, UTC)


def period_of(pushed_at_ms: int, key_period: KeyPeriod) -> str:
    """The key period a push at ``pushed_at_ms`` belongs to: UTC 'YYYYMMDD' or 'YYYYMMDDHH'."""
    return time.strftime(_PERIOD_FORMATS[key_period], time.gmtime(pushed_at_ms // 1000))


def frame_context(name: str, period: str, pushed_at_ms: int) -> bytes:
    """Binds the frame to the object's name and to every field of its header."""
    return f"wal:{name}:{period}:{pushed_at_ms}".encode()


def encode_header(period: str, pushed_at_ms: int) -> bytes:
    raw = period.encode("ascii")
    return _PREFIX.pack(MAGIC, VERSION, len(raw)) + raw + _PUSHED_AT.pack(pushed_at_ms)


def parse_header(data: bytes, what: str) -> WalHeader:
    """Parses the header at the start of ``data``; ``what`` names the object in errors."""
    if len(data) < _PREFIX.size:
        raise IntegrityError(f"{what} is truncated: {len(data)} bytes is not even a header")
    magic, version, length = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise IntegrityError(
            f"{what} is not a drkit WAL object: bad magic 0x{magic.hex()}, expected 0x{MAGIC.hex()}"
        )
    if version != VERSION:
        raise IntegrityError(
            f"{what} has unknown format version {version} (this drkit reads version {VERSION}):"
            " it is damaged or was written by a newer drkit"
        )
    size = _PREFIX.size + length + _PUSHED_AT.size
    if len(data) < size:
        raise IntegrityError(f"{what} is truncated inside its header")
    period = data[_PREFIX.size : _PREFIX.size + length]
    if not (period.isdigit() and len(period) in (8, 10)):
        raise IntegrityError(f"{what} has a malformed key period {period!r} in its header")
    (pushed_at_ms,) = _PUSHED_AT.unpack_from(data, _PREFIX.size + length)
    return WalHeader(period.decode("ascii"), pushed_at_ms, size)


def header_length(prefix: bytes) -> int:
    """The header's full size, from its first ``_PREFIX.size`` bytes (checked by parse_header)."""
    return _PREFIX.size + prefix[5] + _PUSHED_AT.size if len(prefix) >= _PREFIX.size else 0


class _NoRecord(Exception):
    """A WAL key period without any key record."""


class WalKeyring:
    """The DEKs of WAL key periods: finds, unwraps and (for pushes) creates them.

    With ``cache`` (the async pusher, info/verify) a period's DEK is unwrapped once per process;
    every lookup is serialized so that one process never creates or unwraps a period twice.
    """

    def __init__(self, repo: RepoLike, *, cache: bool = True) -> None:
        self.repo = repo
        self._record_auth: RecordAuth | None = None
        self._cache: dict[str, bytes] | None = {} if cache else None
        self._lock = threading.Lock()

    @property
    def _auth(self) -> RecordAuth:
        """Made at first use: the key provider is opened only once a record is read."""
        if self._record_auth is None:
            self._record_auth = RecordAuth(self.repo.storage, self.repo.keys)
        return self._record_auth

    @staticmethod
    def record_prefix(period: str) -> str:
        return f"{KEYS_PREFIX}{period}/"

    def dek(self, period: str, *, create: bool = False) -> bytes:
        """The DEK of ``period``. Without ``create`` a period without key record is an
        IntegrityError (the object that names it was tampered with or its record deleted)."""
        with self._lock:
            if self._cache is not None and period in self._cache:
                return self._cache[period]
            dek = self._load(period)
            if dek is None:
                if not create:
                    raise IntegrityError(
                        f"WAL key period '{period}' has no key record in repository"
                        f" '{self.repo.name}' (expected '{self.record_prefix(period)}0001.json')"
                    )
                dek = self._create(period)
            if self._cache is not None:
                self._cache[period] = dek
            return dek

    def others(self, period: str, tried: bytes) -> Iterator[bytes]:
        """The period's other DEKs, after ``tried`` failed to open one of its objects: each
        further record that unwraps to another key, newest first. A record added to the period
        (copied from another period) unwraps too and must not hide the period's own DEK."""
        for dek in self._unwrap_each(period):
            if dek != tried:
                yield dek

    def _load(self, period: str) -> bytes | None:
        try:
            return next(self._unwrap_each(period), None)
        except _NoRecord:
            return None

    def _unwrap_each(self, period: str) -> Iterator[bytes]:
        """The DEK of each of the period's records that unwraps, newest first (rewraps of one
        DEK come out once each; the caller skips repeats); raises _NoRecord when the period has
        none, the last error when none unwraps."""
        storage = self.repo.storage
        records = sorted(
            (o.key for o in storage.list(self.record_prefix(period)) if o.key.endswith(".json")),
            reverse=True,
        )
        if not records:
            raise _NoRecord(period)
        error: DrkitError | None = None
        unwrapped = False
        for key in records:
            try:
                record = json.loads(storage.read_bytes(key))
                dek = self.repo.keys.unwrap(record)
                self._auth.check_key_record(record, dek, "wal", period, key)
            except json.JSONDecodeError:
                error = IntegrityError(f"WAL key record '{key}' is not valid JSON")
                continue
            except DrkitError as exc:
                error = exc
                continue
            unwrapped = True
            yield dek
        if not unwrapped:
            assert error is not None
            raise error

    def _create(self, period: str) -> bytes:
        # A new period is where a wrong key would start sealing WAL nobody can read back
        check_identity(self.repo.storage, self.repo.keys)
        data_key = self.repo.keys.new_data_key()
        signed = self._auth.sign_key_record(data_key.record, data_key.plaintext, "wal", period)
        record = json.dumps(signed, sort_keys=True, indent=2).encode()
        try:
            self.repo.storage.write_bytes(f"{self.record_prefix(period)}0001.json", record)
        except ObjectExists:
            # Another pusher created the period's key first: use its record, drop ours.
            dek = self._load(period)
            if dek is None:
                raise
            return dek
        return data_key.plaintext


def write_object(
    repo: RepoLike,
    keyring: WalKeyring,
    wal: WalName,
    source: Readable,
    *,
    key_period: KeyPeriod,
    compress_level: int | None,
    now_ms: int | None = None,
) -> tuple[WrittenObject, FrameInfo]:
    """Streams ``source`` into the write-once object of ``wal``; returns once it is durable.

    Raises ObjectExists (before or at commit) when the object already exists; nothing is
    overwritten and nothing partial ever becomes visible.
    """
    with repo.storage.open_write(wal.key) as writer:
        pushed_at_ms = int(time.time() * 1000) if now_ms is None else now_ms
        period = period_of(pushed_at_ms, key_period)
        dek = keyring.dek(period, create=True)
        writer.write(encode_header(period, pushed_at_ms))
        frame = FrameWriter(
            writer.write,
            dek,
            frame_context(wal.name, period, pushed_at_ms),
            compress_level=compress_level,
        )
        buffer = bytearray(READ_CHUNK)
        view = memoryview(buffer)
        while True:
            count = source.readinto(view)
            if not count:
                break
            frame.write(view[:count])
        info = frame.close()
        written = writer.commit()
    return written, info


def read_object(
    repo: RepoLike,
    keyring: WalKeyring,
    wal: WalName,
    sink: Callable[[bytes], object],
    *,
    size: int | None = None,
) -> WalHeader:
    """Authenticates and decodes the archived object of ``wal`` into ``sink``.

    Raises ObjectNotFound when it is not archived, IntegrityError (naming the object) when it is
    damaged or tampered with, a key error when its key cannot be had. What ``sink`` received is
    provisional until this returns (see drkit/codec/frame.py).
    """
    storage = repo.storage
    if size is None:
        size = storage.stat(wal.key).size
    what = f"archived WAL file '{wal.name}' in repository '{repo.name}'"
    with storage.open_read(wal.key) as stream:
        prefix = stream.read(_PREFIX.size)
        header = parse_header(
            prefix + stream.read(max(0, header_length(prefix) - len(prefix))), what
        )
        if size < header.size:
            raise IntegrityError(f"{what} is truncated inside its header")
        dek = keyring.dek(header.period)
        context = frame_context(wal.name, header.period, header.pushed_at_ms)
        first_error = _decode(stream, size - header.size, dek, context, sink, what)
    if first_error is None:
        return header
    # Nothing authenticated under the newest DEK: another record of the period may hold the
    # right one (a record added to the period must not make its WAL unreadable).
    for other in keyring.others(header.period, dek):
        with storage.open_read(wal.key, header.size) as stream:
            if _decode(stream, size - header.size, other, context, sink, what) is None:
                return header
    raise IntegrityError(f"{what} is damaged or was tampered with: {first_error}")


def _decode(
    stream: BinaryIO,
    length: int,
    dek: bytes,
    context: bytes,
    sink: Callable[[bytes], object],
    what: str,
) -> IntegrityError | None:
    """Decodes the frame at ``stream`` into ``sink``. Returns the error when it fails before
    ``sink`` received anything (another DEK may open it), None when it decoded; raises when
    it fails after output began (damage, not a wrong key)."""
    received = False
    try:
        for chunk in decode_frame(stream.read, length, dek, context):
            received = True
            sink(chunk)
    except IntegrityError as exc:
        if received:
            raise IntegrityError(f"{what} is damaged or was tampered with: {exc}") from None
        return exc
    return None


def read_header(repo: RepoLike, wal: WalName) -> WalHeader:
    """The header of the archived object of ``wal``, by a ranged read of its first bytes; not
    authenticated (decode the object for that)."""
    data = repo.storage.read_bytes(wal.key, 0, MAX_HEADER_SIZE)
    return parse_header(data, f"archived WAL file '{wal.name}' in repository '{repo.name}'")
