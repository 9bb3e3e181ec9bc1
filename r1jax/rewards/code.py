"""Code reward: run the model's Python against the example's tests in a sandboxed subprocess.

reward = fraction of tests passed. The program is the last ```python (or bare ```) block
inside <answer>, else the whole answer block; no answer block scores 0.

`example["tests"]` is a list of either
- strings: Python statements (usually `assert f(2) == 4`), each run after the program in
  the program's namespace (`__name__ == "solution"`, so a `__main__` block does not run);
  a test passes if it raises nothing within `timeout_s`;
- dicts {"input": str, "output": str}: the program is run afresh per test with that stdin;
  it passes if it exits normally and its stdout equals "output" line by line, ignoring
  trailing whitespace on lines and blank lines at either end.

The sandbox, per completion (model output never runs in the trainer's process):
- a new `python -I -B` process in a new session (its own process group), in a fresh temp
  dir that is also its HOME and TMPDIR, with a minimal environment, deleted afterwards;
- rlimits set in the child before the program runs: address space (`memory_mb`), file
  size, CPU seconds, open files, no core dumps (no preexec_fn: that is unsafe in a
  threaded trainer);
- no network: a new network namespace (`unshare -n`, or `unshare -rn` as non-root) when
  the kernel allows it; always also an audit hook refusing sockets;
- an audit hook refusing writes outside the temp dir, process creation, signals, ctypes;
- `timeout_s` per test inside the child, and a wall-clock limit over the whole run in the
  parent, after which the process group is killed (SIGKILL) and tests without a result fail.
Weakness, documented in _sandbox_runner.py: the audit hook and the result channel are
Python-level and can be subverted by introspection; the kernel-enforced parts are the
rlimits, the kill and the network namespace. For untrusted RL at scale, also run the
trainer's reward workers in a container.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from r1jax.rewards import stats
from r1jax.rewards.template import R1_TAGS, Tags, answer_text

__all__ = ["make_code_reward", "code_reward", "run_sandboxed", "SandboxResult",
           "extract_program"]

_RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_runner.py")
_STARTUP_S = 5.0  # interpreter start, under load, on top of the per-test budget
_MAX_REPORT_BYTES = 1 << 20
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_program(completion: str, tags: Tags = R1_TAGS) -> str | None:
    answer = answer_text(completion, tags)
    if answer is None:
        return None
    blocks = _FENCE.findall(answer)
    return blocks[-1] if blocks else answer.strip()


@dataclass(frozen=True)
class SandboxResult:
    passed: tuple[bool, ...]
    timed_out: bool  # the wall-clock limit was hit and the process group killed

    @property
    def score(self) -> float:
        return sum(self.passed) / len(self.passed) if self.passed else 0.0


@functools.cache
def _network_prefix() -> tuple[str, ...]:
    """The command prefix that gives the child an empty network namespace, probed once."""
    unshare = shutil.which("unshare")
    if unshare:
        for flags in (("-n",), ("-rn",)) if os.geteuid() == 0 else (("-rn",),):
            try:
                ok = subprocess.run([unshare, *flags, "true"], capture_output=True,
                                    timeout=10).returncode == 0
            except (OSError, subprocess.SubprocessError):
                ok = False
            if ok:
                return (unshare, *flags, "--")
    warnings.warn("code sandbox: no network namespace (unshare unavailable or not permitted);"
                  " network is blocked by the audit hook only", stacklevel=2)
    return ()


def run_sandboxed(program: str, tests: list, *, timeout_s: float = 2.0, memory_mb: int = 1024,
                  file_mb: int = 16, isolate_network: bool | None = None,
                  wall_s: float | None = None) -> SandboxResult:
    """Run `program` against `tests` in a fresh sandboxed process (see module docstring).

    `wall_s`: the whole run's limit; default 5 s for start-up plus `timeout_s` for the
    program and for each test.

    `isolate_network`: None uses a network namespace when available, False never does (the
    audit hook still refuses sockets), True requires one."""
    if isolate_network is False:
        prefix = ()
    else:
        prefix = _network_prefix()
        if isolate_network and not prefix:
            raise RuntimeError("no network namespace available (unshare)")
    wall_s = wall_s or _STARTUP_S + timeout_s * (len(tests) + 1)
    nonce = secrets.token_hex(16)
    payload = json.dumps({
        "program": program, "tests": list(tests), "timeout_s": timeout_s, "nonce": nonce,
        "memory_bytes": memory_mb << 20, "file_bytes": file_mb << 20,
        "cpu_s": int(wall_s) + 1}).encode()
    work = tempfile.mkdtemp(prefix="r1jax-sandbox-")
    env = {"HOME": work, "TMPDIR": work, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
           "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    passed = [False] * len(tests)
    timed_out = False
    try:
        proc = subprocess.Popen([*prefix, sys.executable, "-I", "-B", _RUNNER], cwd=work,
                                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            _feed(proc, payload)
            timed_out = _collect(proc, nonce, passed, time.monotonic() + wall_s)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            proc.stdout.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return SandboxResult(tuple(passed), timed_out)


def _feed(proc, payload: bytes):
    try:
        proc.stdin.write(payload)  # the runner reads all of stdin before anything else
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass


def _collect(proc, nonce: str, passed: list[bool], deadline: float) -> bool:
    """Read result lines until EOF or the deadline; True if the deadline hit first."""
    buf, total = b"", 0
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            if not sel.select(remaining):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                return False
            total += len(chunk)
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                parts = line.decode(errors="replace").split()
                if len(parts) == 3 and parts[0] == nonce and parts[1].isdigit():
                    i = int(parts[1])
                    if i < len(passed):
                        passed[i] = parts[2] == "1"
            if total > _MAX_REPORT_BYTES:
                return False


def make_code_reward(*, tags: Tags = R1_TAGS, timeout_s: float = 2.0, memory_mb: int = 1024,
                     max_parallel: int | None = None, isolate_network: bool | None = None):
    """`max_parallel` sandboxes run at once (default: the CPU count, at most 16)."""
    workers = max_parallel or max(1, min(16, os.cpu_count() or 1))

    def one(completion: str, example: dict) -> SandboxResult | None:
        program = extract_program(completion, tags)
        tests = example.get("tests") or []
        if not program or not tests:
            return None
        return run_sandboxed(program, tests, timeout_s=timeout_s, memory_mb=memory_mb,
                             isolate_network=isolate_network)

    def code_reward(completions: list[str], examples: list[dict]) -> np.ndarray:
        if len(completions) != len(examples):
            raise ValueError("completions and examples differ in length")
        with ThreadPoolExecutor(workers) as ex:
            results = list(ex.map(one, completions, examples))
        stats.count("timeouts", sum(r is not None and r.timed_out for r in results))
        return np.array([r.score if r is not None else 0.0 for r in results], dtype=np.float32)

    return code_reward


code_reward = make_code_reward()
