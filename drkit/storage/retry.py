"""Bounded retries with exponential backoff and full jitter, for remote storage calls.

The policy is the one AWS recommends ("Exponential Backoff And Jitter"): before attempt n+1 sleep
a random time in [0, min(max_delay, base_delay * 2**(n-1))]. Randomising the whole interval
spreads the retries of many clients that failed together (a throttled bucket, a restarted
endpoint), so they do not come back in lockstep.

This module is the one place drkit retries: `retry_call` wraps one request, `Backoff` paces an
operation that resumes where it broke (a response body read from the byte it stopped at). Drivers
of remote stores wrap each request in them and have no retry loop of their own; which errors are
worth retrying is the driver's decision (`retryable`): it knows that a throttling reply or a reset
connection is transient and that "access denied" is not. Retries wrap requests, not whole
`Storage` calls, because a streamed write cannot be replayed from the start and a lost reply to a
conditional commit must be told from a real conflict by the request that sent it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry one call.

    `max_attempts` counts every attempt, the first included (1 = no retries).
    """

    max_attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 20.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("retry delays must not be negative")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** min(attempt - 1, 62))
        return (rng or random).uniform(0, ceiling)


class Attempts:
    """Counts the attempts of one `retry_call`, so a caller can tell a first try from a retry."""

    def __init__(self) -> None:
        self.count = 0


class Backoff:
    """Paces the retries of an operation that resumes where it broke: consecutive failures are
    counted, a success starts the count again."""

    def __init__(
        self, policy: RetryPolicy, describe: str, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self._policy = policy
        self._describe = describe
        self._sleep = sleep
        self.failures = 0

    def failed(self, err: BaseException) -> bool:
        """Count a failure; False if it was the last attempt allowed (the caller raises), else
        True after sleeping the backoff delay (the caller resumes)."""
        self.failures += 1
        if self.failures >= self._policy.max_attempts:
            return False
        pause = self._policy.delay(self.failures)
        log.debug("%s broke: %s; resuming in %.2fs", self._describe, err, pause)
        self._sleep(pause)
        return True

    def succeeded(self) -> None:
        self.failures = 0


def retry_call(
    fn: Callable[[], T],
    policy: RetryPolicy,
    retryable: Callable[[BaseException], bool],
    *,
    describe: str = "call",
    attempts: Attempts | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call `fn` until it returns, at most `policy.max_attempts` times.

    An exception for which `retryable` is false is raised at once; a retryable one is raised
    after the last attempt. `attempts.count` (if given) is the number of attempts started.
    """
    counter = attempts or Attempts()
    while True:
        counter.count += 1
        try:
            return fn()
        except Exception as err:
            if counter.count >= policy.max_attempts or not retryable(err):
                raise
            pause = policy.delay(counter.count)
            log.debug(
                "%s failed (attempt %d of %d): %s; retrying in %.2fs",
                describe,
                counter.count,
                policy.max_attempts,
                err,
                pause,
            )
            sleep(pause)
