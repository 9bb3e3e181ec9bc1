"""Counters that rewards bump for items they scored 0 without judging them (timeouts, crashes).

A reward keeps the plain `fn(completions, examples) -> scores` contract and still reports
how many items it could not judge: it calls `count("timeouts", n)`. `RewardSet` collects
these per reward (in the thread that runs it) into its metrics; outside a `RewardSet` the
counts only reach the process-wide `totals`.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import threading

_SINK: contextvars.ContextVar[collections.Counter | None] = contextvars.ContextVar(
    "r1jax_reward_counts", default=None)
_LOCK = threading.Lock()
totals: collections.Counter = collections.Counter()


def count(key: str, n: int = 1) -> None:
    if n <= 0:
        return
    sink = _SINK.get()
    if sink is not None:
        sink[key] += n
    with _LOCK:
        totals[key] += n


@contextlib.contextmanager
def collecting(sink: collections.Counter):
    """Route `count` calls made in this thread/context into `sink`."""
    token = _SINK.set(sink)
    try:
        yield sink
    finally:
        _SINK.reset(token)
