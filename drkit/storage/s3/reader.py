"""Reading one object: ranged GETs, streamed or fetched in parallel, verified when read whole.

Reads
    Ranged GETs (``Range: bytes=a-b``), streamed from the response body. A read of more than one
    `part_size` chunk fetches chunks in parallel (at most `max_concurrency` chunks buffered)
    with ``If-Match`` on the first reply's ETag, so a replaced object cannot be spliced.
    A range past the end is the 416 reply, read as no bytes.

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


class _Source:
    """Bytes of one range of an object, in order."""

    def readinto(self, buffer: memoryview) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _StreamSource(_Source):
    """Streams [pos, end) from a response body, resuming with a new ranged GET when the body
    ends early or breaks (a reset, a timeout)."""

    def __init__(
        self,
        bucket: S3Bucket,
        key: str,
        s3key: str,
        etag: str | None,
        pos: int,
        end: int,
        body: Any = None,
    ) -> None:
        self._bucket = bucket
        self._key = key
        self._s3key = s3key
        self._etag = etag
        self._pos = pos
        self._end = end
        self._body = body
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
                self._close_body()  # this response is done; the next GET continues
                continue
            self._pos += count
            self._backoff.succeeded()
            return count
        self._close_body()
        return 0

    def _open(self) -> Any:
        bucket = self._bucket
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
        return resp["Body"]

    def _close_body(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):
                self._body.close()
            self._body = None

    def close(self) -> None:
        self._close_body()


class _ParallelSource(_Source):
    """Fetches `part_size` chunks of [first_end, end) in parallel, keeping at most
    `max_concurrency` of them in memory; the first chunk comes from the already open body."""

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
        chunk = bucket.config.part_size
        self._ranges = deque((pos, min(pos + chunk, end)) for pos in range(first_end, end, chunk))
        self._executor = ThreadPoolExecutor(
            bucket.config.max_concurrency, thread_name_prefix="drkit-s3-get"
        )
        self._pending: deque[Future[bytearray]] = deque()
        self._pending.append(self._executor.submit(self._fetch, start, first_end, body))
        while self._ranges and len(self._pending) < bucket.config.max_concurrency:
            self._schedule()
        self._current = memoryview(b"")

    def _schedule(self) -> None:
        begin, stop = self._ranges.popleft()
        self._pending.append(self._executor.submit(self._fetch, begin, stop, None))

    def _fetch(self, begin: int, stop: int, body: Any) -> bytearray:
        data = bytearray(stop - begin)
        view = memoryview(data)
        source = _StreamSource(self._bucket, self._key, self._s3key, self._etag, begin, stop, body)
        got = 0
        try:
            while got < len(data):
                count = source.readinto(view[got:])
                if not count:
                    raise StorageError(f"reading '{self._key}' ended early at byte {begin + got}")
                got += count
        finally:
            source.close()
        return data

    def readinto(self, buffer: memoryview) -> int:
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
