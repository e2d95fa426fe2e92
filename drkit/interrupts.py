"""SIGINT and SIGTERM as an exception: the command unwinds (sessions closed, locks and leases
released) and says so, instead of dying mid-step or waiting for the slowest worker.

``Interrupted`` is a BaseException so that no ``except Exception`` swallows it; thread pools
given one do not wait for their running tasks (drkit/pools.py): what those tasks still write is
never listed (a backup is listed only by its manifest, written last), and the next run removes
it, as after a kill. A restore closes its target to its workers before it empties it again
(restore/paths.py). Standard library only: ``wal-push`` imports the pools.

A command whose pools must finish their running tasks first passes its own subclass, with
``wait_for_workers`` set, to ``interruptible()``: a drill (drill/sandbox.py) removes the sandbox
its restore writes into on the way out.

Python runs signal handlers in the main thread only, between two steps of its own: a signal that
the kernel hands to another thread (any thread may take a signal sent to the process), or that
lands just before the main thread starts to wait, is noted but wakes nothing, and the main thread
sleeps on until what it waits for ends (a chunk compressed at level 19: tens of seconds). So while
a block is interruptible, a relay thread learns of every signal (the wakeup fd) and knocks on the
main thread (``_KNOCK``) until it has run its handlers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived; ``exit_code`` is the shell's 128 + the signal's number.
    ``wait_for_workers``: whether thread pools let their running tasks end before it unwinds
    further (their queued tasks are cancelled either way)."""

    wait_for_workers = False

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.signal = signal.Signals(signum).name
        # What the interrupted operation left behind, said while it unwinds (for the message)
        self.left_behind = ""

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Wakes the main thread to run its handlers: ignored by default, so one arriving after the block
# ended does nothing
_KNOCK = signal.SIGURG
_KNOCK_EVERY = 0.05  # seconds: a knock can land just before the main thread waits, like a signal


@contextlib.contextmanager
def interruptible(exc: type[Interrupted] = Interrupted) -> Iterator[None]:
    """Turn SIGTERM and SIGINT into ``exc`` for the duration, raised in the main thread within
    moments whatever it is waiting for (main thread only; elsewhere the handlers stay as they
    are)."""

    def raise_interrupted(signum: int, frame: FrameType | None) -> None:
        raise exc(signum)

    with _handled_by(raise_interrupted), _relayed():
        yield


def uninterruptible() -> contextlib.AbstractContextManager[None]:
    """Ignore SIGTERM and SIGINT for the duration (main thread only): for the short cleanup an
    interruption starts, which a second Ctrl-C must not cut short."""
    return _handled_by(signal.SIG_IGN)


@contextlib.contextmanager
def _handled_by(
    handler: signal.Handlers | Callable[[int, FrameType | None], None],
) -> Iterator[None]:
    try:
        previous = {signum: signal.signal(signum, handler) for signum in _SIGNALS}
    except ValueError:  # not the main thread: the caller's handlers stay in charge
        yield
        return
    try:
        yield
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)


@contextlib.contextmanager
def _relayed() -> Iterator[None]:
    """Knock on the main thread after every signal until it has run its handlers (main thread
    only; nothing if an outer block relays already or the wakeup fd is someone else's)."""
    read_fd, write_fd = os.pipe()
    try:
        os.set_blocking(write_fd, False)  # the C-level handler must never wait on it
        try:
            earlier = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except ValueError:  # not the main thread
            earlier = None
        if earlier != -1:
            if earlier is not None:
                signal.set_wakeup_fd(earlier)
            yield
            return
        relay = _Relay(read_fd)
        before = signal.signal(_KNOCK, relay.answered)
        relay.start()
        try:
            yield
        finally:
            signal.set_wakeup_fd(-1)
            relay.stop(write_fd)
            signal.signal(_KNOCK, before)
    finally:
        os.close(read_fd)
        os.close(write_fd)


class _Relay:
    """A thread reading the signal numbers Python's C-level handler writes to the wakeup fd
    (whichever thread took the signal): for any but ``_KNOCK``, it sends ``_KNOCK`` to the main
    thread until the handler of a knock runs there, which means the main thread went through its
    pending handlers (Python runs them all in one pass)."""

    def __init__(self, read_fd: int) -> None:
        self._fd = read_fd
        self._main = threading.main_thread().ident
        self._answered = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drkit-signals", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, write_fd: int) -> None:
        self._stopping.set()
        os.write(write_fd, b"\0")  # wakes the read (no signal has number 0)
        self._thread.join()

    def answered(self, signum: int, frame: FrameType | None) -> None:
        self._answered.set()

    def _run(self) -> None:
        assert self._main is not None
        while True:
            noted = os.read(self._fd, 64)
            if not noted or self._stopping.is_set():  # stopped, or the pipe closed under us
                return
            if not set(noted) - {_KNOCK}:
                continue
            self._answered.clear()
            while not self._stopping.is_set():
                signal.pthread_kill(self._main, _KNOCK)
                if self._answered.wait(_KNOCK_EVERY):
                    break
