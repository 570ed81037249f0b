"""waiting — the trainer tests' one way to wait for another thread's effect.

A condition polled every 10 ms up to a deadline: long enough for a loaded 2-core CI
machine (a passing wait costs nothing), never a fixed sleep standing in for it."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(cond: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)
