"""One way to wait: ask a question again and again until it has an answer or time runs out."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll_until(
    check: Callable[[], T],
    timeout: float,
    failure: str | Callable[[], str],
    interval: float = 0.5,
) -> T:
    """Call `check` every `interval` s until it returns something truthy, and return that.

    After `timeout` s without an answer, raise `TimeoutError` with `failure` (a callable makes
    the message when it is needed, so it can say how far the wait got). `check` may raise to
    end the wait early, for example when the process it waits for has died.
    """
    deadline = time.monotonic() + timeout
    while not (answer := check()):
        if time.monotonic() >= deadline:
            raise TimeoutError(failure() if callable(failure) else failure)
        time.sleep(interval)
    return answer
