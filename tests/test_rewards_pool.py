"""The worker pool: per-item deadlines, crash isolation, reuse."""
import functools
import operator
import os
import time

import pytest

from r1jax.rewards import pool as pool_module
from r1jax.rewards.pool import ERROR, OK, TIMEOUT, WorkerPool


@pytest.fixture(scope="module")
def pool():
    p = WorkerPool(n_workers=2)
    yield p
    p.close()


def test_results_in_order(pool):
    out = pool.map(operator.add, [(i, i) for i in range(50)], timeout_s=5)
    assert out == [(OK, 2 * i) for i in range(50)]
    assert pool.map(operator.add, [], timeout_s=5) == []


def test_hung_item_times_out_alone(pool):
    t = time.perf_counter()
    out = pool.map(time.sleep, [(0,), (60,), (0,), (0,)], timeout_s=1.0)
    assert time.perf_counter() - t < 5
    assert [s for s, _ in out] == [OK, TIMEOUT, OK, OK]


def test_raising_and_crashing_items_are_errors(pool):
    out = pool.map(int, [("1",), ("x",)], timeout_s=5)
    assert out[0] == (OK, 1) and out[1][0] == ERROR and "ValueError" in out[1][1]
    out = pool.map(os._exit, [(3,)], timeout_s=5)
    assert out[0][0] == ERROR
    assert pool.map(operator.mul, [(6, 7)], timeout_s=5) == [(OK, 42)]  # replaced, still works


def test_broken_initializer_fails_fast_instead_of_hanging():
    broken = WorkerPool(n_workers=1, initializer=os.abort)
    t = time.perf_counter()
    out = broken.map(operator.add, [(1, 2)], timeout_s=5)
    broken.close()
    assert out[0][0] == ERROR and time.perf_counter() - t < 30


def test_late_timeouts_leave_the_rest_to_fresh_workers(monkeypatch):
    """A replacement started late in a long call gets its own start-up time: the call is
    already older than the start-up limit when its only worker times out."""
    monkeypatch.setattr(pool_module, "_STARTUP_TIMEOUT_S", 3.0)
    p = WorkerPool(n_workers=1)
    try:
        out = p.map(time.sleep, [(60,), (0,), (0,)], timeout_s=3.0)
    finally:
        p.close()
    assert [s for s, _ in out] == [TIMEOUT, OK, OK]


def test_hanging_initializer_fails_after_the_startup_timeout(monkeypatch):
    monkeypatch.setattr(pool_module, "_STARTUP_TIMEOUT_S", 1.0)
    hanging = WorkerPool(n_workers=1, initializer=functools.partial(time.sleep, 60))
    t = time.perf_counter()
    out = hanging.map(operator.add, [(1, 2)], timeout_s=5)
    hanging.close()
    assert out == [(ERROR, "workers failed to start")] and time.perf_counter() - t < 10
