"""The background fetcher of ``wal-fetch --prefetch`` (drkit/wal/prefetch.py tells the whole
protocol): one process per recovering cluster keeps the segments after the one PostgreSQL last
asked for ready in the spool, and stops when recovery no longer needs it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from drkit.errors import DrkitError
from drkit.private_dir import write_pid
from drkit.repo.wal_names import parse_wal_name
from drkit.wal.prefetch import (
    ANSWER_FILE,
    IDLE,
    KEEP,
    FetchSpool,
    alive,
    remove_stale_spools,
    spool_path,
)
from drkit.wal.quick import (
    DIRECT,
    FETCHING,
    HISTORY,
    INFO,
    MISSING,
    PART,
    SIGNAL_FILES,
    WANT_FILE,
    request_line,
)

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

    from drkit.wal.config import WalConfig
    from drkit.wal.operation import WalSources

log = logging.getLogger(__name__)

POLL = 0.02  # seconds between looks at the request, the server and the fetches
MISSING_RETRY = 1.0  # seconds before a segment that was not archived is asked for again


def segment_name(timeline: int, segno: int, segment_size: int) -> str:
    per_id = 0x100000000 // segment_size
    return f"{timeline:08X}{segno // per_id:08X}{segno % per_id:08X}"


def segment_number(name: str, segment_size: int) -> int:
    return int(name[8:16], 16) * (0x100000000 // segment_size) + int(name[16:24], 16)


class Fetcher:
    """The background fetcher of one recovering cluster (``drkit wal-fetcher``)."""

    def __init__(
        self,
        config: WalConfig,
        sources: WalSources,
        pgdata: Path,
        segment_size: int,
        *,
        idle: float = IDLE,
    ) -> None:
        self.sources, self.pgdata, self.segment_size = sources, pgdata, segment_size
        self.ahead, self.workers = config.archive.fetch_ahead, config.archive.process_max
        self.spool = FetchSpool(spool_path(config, pgdata))
        self.idle = idle
        self.missing: dict[str, float] = {}  # not archived (yet), when last asked
        self.failed: set[str] = set()  # damaged or unreadable: left to a direct fetch
        self.full = False  # the spool could not take more: fetch nothing more ahead
        self.asked: dict[str, str] = {}  # fetches made for a request: name -> its token
        self.fetched: dict[str, int] = {}  # spooled: name -> when (CLOCK_MONOTONIC ns)
        self.acknowledged = self.answered = ""  # the last request taken up, and answered
        self.flush = _same_file_system(self.spool.fd, pgdata / "pg_wal")

    def run(self) -> int:
        """Fetch ahead until recovery no longer needs it; 0 at once if a fetcher runs."""
        lock = None
        for _ in range(5):  # a request probing the lock holds it for an instant
            lock = self.spool.try_lock()
            if lock is not None:
                break
            time.sleep(0.01)
        if lock is None:
            return 0
        try:
            self.spool.clear()
            write_pid(lock)
            self.spool.write(ANSWER_FILE, "- -\n")  # requests may wait for its answers
            remove_stale_spools(self.spool.path)
            postmaster = _postmaster_pid(self.pgdata)
            if postmaster is not None:
                self._loop(postmaster)
        finally:
            self.spool.clear()
            os.close(lock)
            self.spool.close()
        return 0

    def _loop(self, postmaster: int) -> None:
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        inflight: dict[str, Future[int]] = {}
        last_want, changed, timeline, position = None, time.monotonic(), None, None
        with ThreadPoolExecutor(self.workers, thread_name_prefix="wal-fetch") as pool:
            try:
                while True:
                    want = self.spool.read(WANT_FILE), _mtime(self.spool, WANT_FILE)
                    if want != last_want:
                        last_want, changed = want, time.monotonic()
                    name, token = request_line(want[0] or "")
                    stop = self._stop_reason(postmaster, name, timeline)
                    if stop is None and not inflight and time.monotonic() - changed > self.idle:
                        stop = f"no request for {self.idle:g}s"
                    if stop is not None:
                        log.info("stopped fetching ahead: %s", stop)
                        return
                    if not name.endswith(HISTORY):
                        position = name
                        timeline = parse_wal_name(name).timeline
                    for done in [n for n, f in inflight.items() if f.done()]:
                        self._finished(done, inflight.pop(done))
                    if token:
                        self._answer(pool, name, token, inflight)
                    if position is not None:
                        self._schedule(pool, position, name, inflight)
                    if inflight:
                        wait(inflight.values(), timeout=POLL, return_when=FIRST_COMPLETED)
                    else:
                        time.sleep(POLL)
            finally:
                for future in inflight.values():
                    future.cancel()

    def _answer(
        self, pool: ThreadPoolExecutor, name: str, token: str, inflight: dict[str, Future[int]]
    ) -> None:
        """Take up the request ``token`` for ``name`` (see drkit/wal/quick.py): the file goes
        to the spool, or the request learns it is not archived or must fetch it itself."""
        if token == self.answered:
            return
        if self.spool.ready(name) or self.fetched.get(name, 0) > _asked_at(token):
            self.answered = token  # spooled since it was asked: the request takes it
            return
        if name in self.failed or (self.full and name not in inflight):
            self._publish_answer(token, DIRECT)
            return
        if name not in inflight:
            if self.asked.get(name) == token:  # checked since the request was made: not there
                self._publish_answer(token, MISSING)
                return
            self.asked[name] = token
            inflight[name] = pool.submit(self._fetch, name)
        if self.acknowledged != token:
            self.spool.write(ANSWER_FILE, f"{token} {FETCHING}\n")
            self.acknowledged = token

    def _publish_answer(self, token: str, verdict: str) -> None:
        self.spool.write(ANSWER_FILE, f"{token} {verdict}\n")
        self.answered = token

    def _stop_reason(self, postmaster: int, name: str, timeline: int | None) -> str | None:
        if not alive(postmaster):
            return "the server stopped"
        if not any((self.pgdata / signal).exists() for signal in SIGNAL_FILES):
            return "recovery ended"
        try:
            wanted = parse_wal_name(name)
        except ValueError:
            return f"unexpected request {name!r}"
        if wanted.kind == "history":
            return None  # answered; the timeline changes with the next segment asked for
        if wanted.kind != "segment" or timeline not in (None, wanted.timeline):
            return f"PostgreSQL asked for {name} (another timeline)"
        return None

    def _schedule(
        self, pool: ThreadPoolExecutor, position: str, want: str, inflight: dict[str, Future[int]]
    ) -> None:
        """Drop what recovery passed, then start fetches in the window after segment
        ``position``, the last one asked for (``want``, the file asked for now, is kept)."""
        timeline, current = int(position[:8], 16), segment_number(position, self.segment_size)
        window = [
            segment_name(timeline, current + i, self.segment_size) for i in range(1, self.ahead + 1)
        ]
        keep = {*KEEP, ANSWER_FILE, want, want + INFO, position, position + INFO}
        for name in [*window, *inflight]:
            keep |= {name, name + INFO, name + PART}
        for name in self.spool.names():
            # never a temporary: a fetch may create one at any moment, while this looks
            if name not in keep and not name.startswith("."):
                self.spool.remove(name)
        spooled = sum(1 for name in window if self.spool.ready(name)) + len(inflight)
        for name in window:
            if self.full or len(inflight) >= self.workers or spooled >= self.ahead:
                return
            if name in self.failed or name in inflight or self.spool.ready(name):
                continue
            if time.monotonic() - self.missing.get(name, -MISSING_RETRY) < MISSING_RETRY:
                return  # not archived (yet): nothing beyond it either
            inflight[name] = pool.submit(self._fetch, name)
            spooled += 1

    def _fetch(self, name: str) -> int:
        """Fetch ``name`` into the spool; when it was in place (CLOCK_MONOTONIC ns), or 0 when
        it is not archived."""
        from drkit.wal.operation import WalFetchRequest, fetch_from

        result = fetch_from(self.sources, WalFetchRequest(name, self.spool.path / (name + PART)))
        if not result.fetched:
            return 0
        if self.flush:
            self._flush(name + PART)
        lines = [result.repo or "", *(w.message for w in result.warnings)]
        self.spool.write(name + INFO, "".join(f"{' '.join(line.split())}\n" for line in lines))
        os.rename(name + PART, name, src_dir_fd=self.spool.fd, dst_dir_fd=self.spool.fd)
        return time.monotonic_ns()

    def _flush(self, name: str) -> None:
        """Write the segment out now, off recovery's critical path: PostgreSQL fsyncs every
        file restore_command gives it (it keeps it in pg_wal with a durable rename) and waits
        for that, so a segment renamed into place still dirty would be written out while replay
        waits, once per segment."""
        fd = self.spool.open(name, os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def _finished(self, name: str, future: Future[int]) -> None:
        from drkit.wal.fetch import WalFetchError

        asked = self.asked.pop(name, None)
        try:
            spooled = future.result()
            if spooled:
                log.info("fetched %s %s", name, "on request" if asked else "ahead")
                self.missing.pop(name, None)
                self.fetched[name] = spooled
            else:
                self.missing[name] = time.monotonic()
                if asked is not None:
                    self.asked[name] = asked  # its request is answered on the next look
            return
        except (WalFetchError, OSError) as exc:  # the spool, not the archive
            self.full = True
            message = exc.message if isinstance(exc, DrkitError) else str(exc)
            log.warning("the spool takes no more segments, fetching directly: %s", message)
        except DrkitError as exc:
            log.warning("%s not fetched ahead (a direct fetch will say why): %s", name, exc.message)
        except Exception as exc:  # a bug must not kill the fetcher: a direct fetch takes over
            log.warning("%s not fetched ahead: unexpected error %r", name, exc)
        self.failed.add(name)
        self.spool.remove(name + PART)
        self.spool.remove(name + INFO)


def _asked_at(token: str) -> int:
    """When the request with ``token`` was made (CLOCK_MONOTONIC ns, as the quick path put it)."""
    stamp = token.rpartition(".")[2]
    return int(stamp) if stamp.isdigit() else 0


def _mtime(spool: FetchSpool, name: str) -> int:
    try:
        return os.stat(name, dir_fd=spool.fd, follow_symlinks=False).st_mtime_ns
    except FileNotFoundError:
        return 0


def _same_file_system(spool_fd: int, wal_dir: Path) -> bool:
    """Segments are renamed from the spool into ``wal_dir`` (not copied)."""
    try:
        return os.fstat(spool_fd).st_dev == os.stat(wal_dir).st_dev
    except OSError:
        return False


def _postmaster_pid(pgdata: Path) -> int | None:
    try:
        first = (pgdata / "postmaster.pid").read_text().split("\n", 1)[0].strip()
    except OSError:
        return None
    return int(first) if first.isdigit() else None


def run_fetcher(
    config: WalConfig,
    pgdata: Path,
    segment_size: int,
    recovery_key: Path | None = None,
    repos: list[str] | None = None,
    *,
    idle: float = IDLE,
) -> int:
    """``drkit wal-fetcher``: fetch ahead for the cluster recovering in ``pgdata``."""
    from drkit.wal.operation import WalSources

    sources = WalSources(config, recovery_key, repos, cache=True)
    return Fetcher(config, sources, pgdata, segment_size, idle=idle).run()
