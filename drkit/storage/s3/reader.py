"""Reading one object: ranged GETs, streamed or fetched in parallel, verified when read whole.

Reads
    Ranged GETs (``Range: bytes=a-b``), streamed from the response body. A read longer than one
    range is split into ranges sized to it (`range_size`: the read spread over
    `max_concurrency` GETs, each between MIN_RANGE and `part_size` bytes) fetched in parallel
    with ``If-Match`` on the first reply's ETag, so a replaced object cannot be spliced. The
    first range streams to the reader as it arrives while the next ones download, so decoding
    overlaps the download; at most `max_concurrency` ranges are in flight, so memory stays
    bounded whatever the object's size. A reply must hold exactly the bytes asked for (its
    Content-Range is checked; a body that ends early is resumed, within the retry budget, never
    taken as complete). A range past the end is the 416 reply, read as no bytes. A sequential
    read (the caller reads other ranges in parallel itself, as a restore does) is streamed by
    one GET for the whole range instead: fewer, longer requests, each resumed the same way.

A read of a whole object is checked by `_Verifier` as it streams (drkit.storage.s3.checksums
describes what is compared).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from drkit.errors import IntegrityError, StorageError
from drkit.storage.retry import Backoff
from drkit.storage.s3.checksums import META_PART_SIZE, META_SHA256, _composite, _StoredChecksum
from drkit.storage.s3.errors import _PRECONDITION_FAILED, _code, is_transient

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

    from drkit.storage.s3.bucket import S3Bucket
    from drkit.storage.s3.config import S3Config

# The smallest ranged GET worth its round trip (S3's guidance: 8-16 MiB per ranged GET)
MIN_RANGE = 8 * 1024 * 1024


def range_size(length: int, config: S3Config) -> int:
    """Bytes per ranged GET for a read of `length` bytes: the read spread over
    `max_concurrency` GETs, but no less than MIN_RANGE (a GET costs a round trip) and no more
    than `part_size` (memory: up to `max_concurrency` ranges are buffered at once)."""
    spread = -(-length // config.max_concurrency)
    return max(min(MIN_RANGE, config.part_size), min(spread, config.part_size))


def check_range(resp: dict[str, Any], key: str, where: str, start: int, stop: int) -> None:
    """Refuse a reply to a GET of bytes [start, stop) that holds other bytes: one that starts
    elsewhere, or that holds more than asked or nothing. A reply without Content-Range (a store
    that ignored the Range header sent the whole object) is read from byte 0 only."""
    length = int(resp.get("ContentLength") or 0)
    content_range = resp.get("ContentRange") or ""
    first, _, last = content_range.removeprefix("bytes ").partition("/")[0].partition("-")
    if first.isdigit() and last.isdigit():
        got = (int(first), int(last) + 1)
        if got[0] == start and got[1] - got[0] == length and 0 < length <= stop - start:
            return
    else:
        got = (0, length)
        if start == 0 and length > 0:
            return
    raise StorageError(
        f"{where} answered bytes {got[0]}-{got[1] - 1} ({length} bytes) to a read of bytes"
        f" {start}-{stop - 1} of object '{key}'",
        hint="the store or a proxy in front of it mishandles ranged reads (the Range header)",
    )


class _Source:
    """Bytes of one range of an object, in order."""

    def readinto(self, buffer: memoryview) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _StreamSource(_Source):
    """Streams [pos, end) from a response body, resuming with a new ranged GET when the body
    ends early or breaks (a reset, a timeout). A `body` already open may hold only
    [pos, body_end): the rest then comes by a new GET, no failure."""

    def __init__(
        self,
        bucket: S3Bucket,
        key: str,
        s3key: str,
        etag: str | None,
        pos: int,
        end: int,
        body: Any = None,
        body_end: int | None = None,
    ) -> None:
        self._bucket = bucket
        self._key = key
        self._s3key = s3key
        self._etag = etag
        self._pos = pos
        self._end = end
        self._body = body
        self._body_end = end if body_end is None else body_end
        self._backoff = Backoff(bucket.retry, f"reading '{key}'")

    def readinto(self, buffer: memoryview) -> int:
        while self._pos < self._end:
            if self._body is None:
                self._body = self._open()
            view = buffer[: self._end - self._pos]
            if not view:
                return 0
            try:
                count = self._body.readinto(view)
            except Exception as err:
                if not is_transient(err):
                    raise
                self._close_body()
                if not self._backoff.failed(err):
                    raise self._bucket.errors.failed(
                        err, "reading", self._key, self._backoff.failures
                    ) from err
                continue
            if not count:
                self._close_body()
                if self._pos == self._body_end:
                    continue  # the first reply asked for less than the range: GET the rest
                # The reply ended before the range did: resume with a new GET, within the
                # retry budget (a store that keeps answering short is an error, not an end).
                early = StorageError(f"reading '{self._key}' ended early at byte {self._pos}")
                if not self._backoff.failed(early):
                    raise early
                continue
            self._pos += count
            self._backoff.succeeded()
            return count
        self._close_body()
        return 0

    def _open(self) -> Any:
        bucket = self._bucket
        self._body_end = self._end
        try:
            resp = bucket.get_range(
                self._key,
                self._s3key,
                self._pos,
                self._end,
                etag=self._etag,
                passthrough=_PRECONDITION_FAILED | {"InvalidRange"},
            )
        except ClientError as err:
            if _code(err) == "InvalidRange":
                raise StorageError(
                    f"object '{self._key}' in {bucket.errors.where()} ended at byte {self._pos},"
                    f" before the {self._end} bytes it had when the read began"
                ) from None
            raise bucket.errors.changed(self._key) from None
        check_range(resp, self._key, bucket.errors.where(), self._pos, self._end)
        return resp["Body"]

    def _close_body(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):
                self._body.close()
            self._body = None

    def close(self) -> None:
        self._close_body()


class _ParallelSource(_Source):
    """Reads [start, end) as ranges of `range_size` bytes: the first streams from the already
    open body [start, first_end) as it arrives, while the following ones are fetched in
    parallel into buffers, at most `max_concurrency` ranges in flight (the streaming one
    included), each scheduled as an earlier one is handed out."""

    def __init__(
        self,
        bucket: S3Bucket,
        key: str,
        s3key: str,
        etag: str | None,
        start: int,
        first_end: int,
        end: int,
        body: Any,
    ) -> None:
        self._bucket = bucket
        self._key = key
        self._s3key = s3key
        self._etag = etag
        size = range_size(end - start, bucket.config)
        self._ranges = deque((pos, min(pos + size, end)) for pos in range(first_end, end, size))
        self._window = bucket.config.max_concurrency
        self._executor = ThreadPoolExecutor(self._window, thread_name_prefix="drkit-s3-get")
        self._first: _Source | None = _StreamSource(
            bucket, key, s3key, etag, start, first_end, body
        )
        self._pending: deque[Future[bytearray]] = deque()
        while self._ranges and len(self._pending) < self._window - 1:
            self._schedule()
        self._current = memoryview(b"")

    def _schedule(self) -> None:
        begin, stop = self._ranges.popleft()
        self._pending.append(self._executor.submit(self._fetch, begin, stop))

    def _fetch(self, begin: int, stop: int) -> bytearray:
        data = bytearray(stop - begin)
        view = memoryview(data)
        source = _StreamSource(self._bucket, self._key, self._s3key, self._etag, begin, stop)
        got = 0
        try:
            while got < len(data):
                got += source.readinto(view[got:])  # 0 only with every byte in (or it raises)
        finally:
            source.close()
        return data

    def readinto(self, buffer: memoryview) -> int:
        if self._first is not None:
            count = self._first.readinto(buffer)
            if count:
                return count
            self._first.close()
            self._first = None
            if self._ranges:
                self._schedule()  # the streamed range's place in the window
        if not self._current:
            if not self._pending:
                return 0
            self._current = memoryview(self._pending.popleft().result())
            if self._ranges:
                self._schedule()
        count = min(len(buffer), len(self._current))
        buffer[:count] = self._current[:count]
        self._current = self._current[count:]
        return count

    def close(self) -> None:
        if self._first is not None:
            self._first.close()
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)


class _Verifier:
    """Checks a whole-object read against what drkit recorded when it wrote the object."""

    def __init__(
        self,
        bucket: S3Bucket,
        key: str,
        s3key: str,
        etag: str | None,
        metadata: dict[str, str],
        total: int,
        stored_checksum: Callable[[], _StoredChecksum] | None = None,
    ) -> None:
        self._bucket = bucket
        self._key = key
        self.total = total
        self.seen = 0
        self._expected = metadata.get(META_SHA256)
        self._whole = hashlib.sha256() if self._expected else None
        part_size = metadata.get(META_PART_SIZE, "")
        self._part_size = int(part_size) if part_size.isdigit() and int(part_size) > 0 else None
        self._part = hashlib.sha256()
        self._part_fill = 0
        self._digests: list[bytes] = []
        self._stored_checksum = stored_checksum or (
            lambda: bucket.stored_checksum(key, s3key, etag)
        )
        self._finished = False

    @property
    def done(self) -> bool:
        return self.seen >= self.total

    def update(self, data: memoryview) -> None:
        self.seen += len(data)
        if self._whole is not None:
            self._whole.update(data)
        elif self._part_size is not None:
            while data:
                take = min(len(data), self._part_size - self._part_fill)
                self._part.update(data[:take])
                self._part_fill += take
                data = data[take:]
                if self._part_fill == self._part_size:
                    self._digests.append(self._part.digest())
                    self._part = hashlib.sha256()
                    self._part_fill = 0

    def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self.seen != self.total:
            raise self._bucket.errors.damaged(
                self._key, f"read {self.seen} bytes but the object has {self.total}"
            )
        if self._whole is not None:
            actual = self._whole.hexdigest()
            if actual != self._expected:
                raise self._bucket.errors.damaged(
                    self._key, f"its SHA-256 is {actual} but drkit wrote {self._expected}"
                )
            return
        if self._part_size is None:
            raise self._bucket.errors.damaged(
                self._key,
                f"it carries no drkit checksum (x-amz-meta-{META_SHA256} or"
                f" x-amz-meta-{META_PART_SIZE}): it was not written by drkit, or was replaced",
            )
        if self._part_fill or not self._digests:
            self._digests.append(self._part.digest())
        parts = len(self._digests)
        actual = _composite(self._digests)
        stored = self._stored_checksum()
        if stored.sha256 is None:
            if stored.others:  # the store checksums objects, but this one has no SHA-256 of ours
                raise self._bucket.errors.damaged(
                    self._key,
                    "the store keeps no SHA-256 checksum for it, so it is not the object drkit"
                    " wrote (drkit sends one with every part)",
                )
            self._bucket.warn_unverifiable(self._key)
            return
        match = stored.matches(actual, parts)
        if match is None:
            # Copied by another tool with other part sizes: no longer comparable here.
            self._bucket.warn_unverifiable(self._key)
        elif not match:
            raise self._bucket.errors.damaged(
                self._key,
                f"its composite SHA-256 is {actual}-{parts} but the store recorded {stored.sha256}",
            )


class _ObjectReader(io.RawIOBase):
    """The raw stream `open_read` returns (buffered): bytes from a source, verified if whole."""

    def __init__(self, source: _Source, verifier: _Verifier | None) -> None:
        super().__init__()
        self._source = source
        self._verifier = verifier
        self._failed: BaseException | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        if self._failed is not None:
            raise self._failed
        view = memoryview(buffer).cast("B")
        if not view:
            return 0
        try:
            count = self._source.readinto(view)
            if self._verifier is not None:
                self._verifier.update(view[:count])
                # Verify before handing out the last bytes: a damaged object never reads whole.
                if count == 0 or self._verifier.done:
                    self._verifier.finish()
        except (IntegrityError, StorageError) as err:
            self._failed = err
            raise
        return count

    def close(self) -> None:
        if not self.closed:
            self._source.close()
        super().close()
