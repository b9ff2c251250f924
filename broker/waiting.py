"""The one way anything in lmteam waits on the fleet: check, then block on a Redis wake-up list.

A process that changes what others wait for pushes to a list (`keys.arrived`, `keys.done`);
the waiter blocks on BLPOP of that list for at most `poll` seconds between checks. A push wakes
it at once; a missed push (it was popped by another waiter, or sent before the wait began)
costs at most one poll, because the check reads the real state every time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TypeVar

import redis

T = TypeVar("T")
_MIN_BLOCK = 0.01  # BLPOP with timeout 0 blocks forever: never ask for less than this


def seconds_left(timeout: float | None) -> Callable[[], float]:
    """A countdown on this process's monotonic clock; None never runs out."""
    if timeout is None:
        return lambda: math.inf
    end = time.monotonic() + timeout
    return lambda: end - time.monotonic()


def wait_for(check: Callable[[], T | None], left: Callable[[], float], *, client: redis.Redis | None = None,
             wake: str | None = None, poll: float = 0.25) -> T | None:
    """check() until it returns something other than None (returned), or `left()` reaches 0 (None).

    `left` may read any clock (the round gate uses Redis's, shared by the whole fleet). Between
    checks the waiter blocks on BLPOP of `wake` when given, else sleeps, for at most `poll` seconds.
    """
    while True:
        out = check()
        if out is not None:
            return out
        remaining = left()
        if remaining <= 0:
            return None
        pause = max(_MIN_BLOCK, min(remaining, poll))
        if client is not None and wake is not None:
            client.blpop([wake], timeout=pause)
        else:
            time.sleep(pause)


def notify(client: redis.Redis, key: str, ttl: int) -> None:
    """Wake whoever waits on `key`; the list expires with the round it belongs to."""
    pipe = client.pipeline()
    pipe.rpush(key, 1)
    pipe.expire(key, ttl)
    pipe.execute()
