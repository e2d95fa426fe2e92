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
"""

from __future__ import annotations

import contextlib
import signal
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


def interruptible(exc: type[Interrupted] = Interrupted) -> contextlib.AbstractContextManager[None]:
    """Turn SIGTERM and SIGINT into ``exc`` for the duration (main thread only; elsewhere the
    handlers stay as they are)."""

    def raise_interrupted(signum: int, frame: FrameType | None) -> None:
        raise exc(signum)

    return _handled_by(raise_interrupted)


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
