"""A small persistent process pool with per-item deadlines, for verifiers that can hang.

Why not multiprocessing.Pool or ProcessPoolExecutor: neither can stop one stuck task. Here
each worker holds one item at a time; a worker that misses its item's deadline is killed and
replaced, and only that item is lost. Workers send "ready" once their initializer has run,
so import time never eats into an item's deadline, and each worker's start-up is timed from its
own spawn: a replacement started late in a long call gets the same time to start as the first.

Workers are fresh interpreters (`python -c`, never a fork of a trainer holding accelerator
runtimes and threads) that speak multiprocessing's Connection protocol over a socketpair.
This is multiprocessing's "spawn" minus one step: spawn re-imports the parent's `__main__`
script in every worker, which crashes every worker of an unguarded script or a notebook
cell into a respawn loop; these workers import only the callables they are sent.
"""

from __future__ import annotations

import atexit
import collections
import json
import multiprocessing.connection
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

OK, TIMEOUT, ERROR = "ok", "timeout", "error"
Outcome = tuple[str, Any]  # (status, value); value is the result, or a message

_STARTUP_TIMEOUT_S = 120.0  # per worker, from its spawn
_MAX_STARTUP_DEATHS = 3  # per worker slot, in a row: a broken initializer fails fast
_POOLS: weakref.WeakSet = weakref.WeakSet()
_BOOT = ("import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
         "from r1jax.rewards.pool import _worker_main; _worker_main(int(sys.argv[2]))")


def _worker_main(fd: int):
    import pickle
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent owns Ctrl-C
    conn = multiprocessing.connection.Connection(fd)
    try:
        initializer = pickle.loads(conn.recv_bytes())
        if initializer is not None:
            initializer()
        conn.send((None, "ready", None))
        while True:
            msg = conn.recv()
            if msg is None:
                return
            task_id, fn, args = msg
            try:
                out = (task_id, OK, fn(*args))
            except BaseException as e:  # noqa: BLE001 - an item's failure is data, not a crash
                out = (task_id, ERROR, f"{type(e).__name__}: {e}"[:500])
            try:
                conn.send(out)
            except Exception as e:  # an unpicklable result
                conn.send((task_id, ERROR, f"unsendable result: {e}"[:500]))
    except (EOFError, OSError, KeyboardInterrupt):
        return


class _Worker:
    def __init__(self, initializer):
        import pickle
        parent_sock, child_sock = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, json.dumps(sys.path), str(child_sock.fileno())],
            pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL)
        child_sock.close()
        self.conn = multiprocessing.connection.Connection(parent_sock.detach())
        self.conn.send_bytes(pickle.dumps(initializer))
        self.spawned = time.monotonic()
        self.ready = False
        self.task: tuple[int, float] | None = None  # (item index, deadline)

    def kill(self):
        try:
            self.proc.kill()
            self.proc.wait(5)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.conn.close()


class WorkerPool:
    """`map(fn, args_list, timeout_s)` runs `fn(*args)` for each args tuple in worker processes.

    `fn` (and `initializer`) must be importable by name: module-level functions. Returns one
    `(status, value)` per item, status in {"ok", "timeout", "error"}. Thread-safe (calls are
    serialised); workers start on the first call and stop at `close()` or interpreter exit.
    """

    def __init__(self, n_workers: int | None = None,
                 initializer: Callable[[], None] | None = None):
        self.n_workers = n_workers or max(1, min(8, os.cpu_count() or 1))
        self.initializer = initializer
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._next_id = 0
        self.totals = collections.Counter()  # items by status, over the pool's life
        _POOLS.add(self)

    def map(self, fn: Callable, args_list: Sequence[tuple], timeout_s: float) -> list[Outcome]:
        with self._lock:
            return self._map(fn, list(args_list), timeout_s)

    def close(self):
        with self._lock:
            for w in self._workers:
                try:
                    w.conn.send(None)
                except Exception:  # noqa: BLE001
                    pass
            for w in self._workers:
                try:
                    w.proc.wait(1)
                except subprocess.TimeoutExpired:
                    pass
                w.kill()
            self._workers = []

    def _map(self, fn, args_list, timeout_s):
        results: list[Outcome | None] = [None] * len(args_list)
        if not args_list:
            return []
        while len(self._workers) < self.n_workers:
            self._workers.append(_Worker(self.initializer))
        pending = collections.deque(range(len(args_list)))
        task_ids: dict[int, int] = {}  # task id -> item index
        startup_deaths = 0  # since a worker last became ready
        done = 0

        def finish(i, outcome):
            nonlocal done
            if results[i] is None:
                results[i] = outcome
                done += 1
                self.totals[outcome[0]] += 1

        def replace(w, outcome):
            if w.task is not None:
                finish(w.task[0], outcome)
            w.kill()
            self._workers[self._workers.index(w)] = _Worker(self.initializer)

        while done < len(args_list):
            now = time.monotonic()
            for w in self._workers:
                if w.ready and w.task is None and pending:
                    i = pending.popleft()
                    self._next_id += 1
                    task_ids[self._next_id] = i
                    try:
                        w.conn.send((self._next_id, fn, args_list[i]))
                        w.task = (i, now + timeout_s)
                    except Exception as e:  # noqa: BLE001 - unpicklable args, or a dead pipe
                        finish(i, (ERROR, f"send failed: {e}"[:500]))
            deadlines = [w.task[1] for w in self._workers if w.task is not None]
            wait_s = max(0.0, min(deadlines) - now) if deadlines else 1.0
            by_conn = {w.conn: w for w in self._workers}
            for conn in multiprocessing.connection.wait(list(by_conn), timeout=wait_s):
                w = by_conn[conn]
                try:
                    task_id, status, value = conn.recv()
                except (EOFError, OSError):
                    startup_deaths += not w.ready
                    replace(w, (ERROR, "worker died"))
                    continue
                if task_id is None:
                    w.ready = True
                    startup_deaths = 0
                    continue
                i = task_ids.pop(task_id, None)
                if i is not None:
                    finish(i, (status, value))
                w.task = None
            now = time.monotonic()
            for w in list(self._workers):
                if w.task is not None and now > w.task[1]:
                    replace(w, (TIMEOUT, f"no result within {timeout_s}s"))
            # Judged after reading what the workers sent, so a worker that became ready while
            # no call was running is seen as ready, not as stuck.
            if not any(w.ready for w in self._workers) and (
                    all(now - w.spawned > _STARTUP_TIMEOUT_S for w in self._workers)
                    or startup_deaths >= _MAX_STARTUP_DEATHS * self.n_workers):
                # Workers cannot start (a broken or hanging initializer): fail, don't hang, and
                # give the next call fresh workers in place of the stuck ones.
                for w in list(self._workers):
                    if now - w.spawned > _STARTUP_TIMEOUT_S:
                        replace(w, None)
                while pending:
                    finish(pending.popleft(), (ERROR, "workers failed to start"))
                break
        return results


@atexit.register
def _close_all():
    for pool in list(_POOLS):
        pool.close()
