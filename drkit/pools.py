"""Thread pools that never outlive an error.

The command line joins every non-daemon thread before the process exits, so a pool left running
after a failure (an idle worker waits for work forever) turns an error into a hang. Every pool
drkit starts is therefore shut down on every path: on an error, with the work not yet started
cancelled, so the error reaches the user as soon as the running tasks end.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from drkit.interrupts import Interrupted


@contextmanager
def worker_pool(workers: int, name: str) -> Iterator[ThreadPoolExecutor]:
    """A ThreadPoolExecutor of ``workers`` threads named ``name_N``: shut down when the block
    ends; on an error, queued tasks are cancelled (running ones are waited for, except after
    an ``Interrupted`` without ``wait_for_workers``)."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix=name)
    try:
        yield pool
    except Interrupted as exc:
        # The operator asked to stop: do not wait for a running task (a chunk compressed at a
        # high level takes seconds); the command exits without joining it (cli/main.py)
        pool.shutdown(wait=exc.wait_for_workers, cancel_futures=True)
        raise
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
