"""Ctrl-C and SIGTERM stop what the main thread is waiting for at once, whichever thread of the
process the kernel hands the signal to (any thread may take a signal sent to the process)."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from drkit.interrupts import Interrupted, interruptible
from drkit.pools import worker_pool


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_taken_by_a_worker_thread_stops_the_wait_at_once(signum: int) -> None:
    ends = threading.Event()

    def task() -> None:
        _until_the_main_thread_sleeps_in_a_wait()
        # as the kernel may do: this thread takes the signal, the main thread sleeps on
        signal.pthread_kill(threading.get_ident(), signum)
        ends.wait(10)  # a long compression the interruption must not wait for

    started = time.monotonic()
    try:
        with pytest.raises(Interrupted) as raised, interruptible(), worker_pool(1, "t") as pool:
            pool.submit(task).result()
    finally:
        ends.set()
    assert time.monotonic() - started < 2
    assert raised.value.exit_code == 128 + signum


def test_after_the_block_the_signals_are_handled_as_before() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGURG)}
    with interruptible(), interruptible():
        pass
    assert {s: signal.getsignal(s) for s in before} == before
    assert signal.set_wakeup_fd(-1) == -1
    assert [t for t in threading.enumerate() if t.name == "drkit-signals"] == []


def _until_the_main_thread_sleeps_in_a_wait() -> None:
    main = threading.main_thread()
    assert main.ident is not None
    stat = Path(f"/proc/self/task/{main.native_id}/stat")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        frame = sys._current_frames().get(main.ident)
        # the process state is the field after the command name, "(...)"
        waits = frame is not None and frame.f_code.co_name == "wait"
        if waits and stat.read_text().rsplit(")", 1)[1].split()[0] == "S":
            return
        time.sleep(0.001)
    raise AssertionError("the main thread never waited")
