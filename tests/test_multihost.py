"""Runs as separate processes: two processes with 4 CPU devices each (gloo) train like one with 8, and a
run killed with SIGKILL mid-stage resumes to the uninterrupted run with each step once on disk."""
import os
import signal
import time

import numpy as np
import pytest
from conftest import finish, start_training

from r1jax.metrics import read_metrics
from test_r1_zero import TIMING, TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start(run_dir, cache, n_proc, devices_each, extra=()):
    return start_training(["--recipe", "r1_zero", *TINY, f"run_dir={run_dir}", f"base.cache_dir={cache}", *extra],
                          n_proc, devices_each, cwd=ROOT)


def _records(run_dir, dedupe=True):
    return [{k: v for k, v in r.items() if k not in TIMING}
            for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"), dedupe=dedupe)]


# The short run (make test-slow, with the full-length one): two steps, no evaluation. (The tiny base earns no reward,
# so advantages are 0 and the comparison is of the pipeline: sampling, per-process scoring, placement,
# the update and the metrics' reductions.)
SHORT = ["rl.steps=2", "eval.every=0"]


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """One process with 8 devices, uninterrupted; it also builds the base-model cache the others reuse."""
    tmp = tmp_path_factory.mktemp("multihost")
    finish(_start(tmp / "one", tmp / "cache", 1, 8))
    return tmp, _records(tmp / "one")


def _assert_match(reference, two):
    assert [(r["kind"], r["step"]) for r in reference] == [(r["kind"], r["step"]) for r in two]
    for a, b in zip(reference, two):
        for key, value in a.items():
            if isinstance(value, float):
                # Same programs over the same 8-device mesh; cross-process reductions may
                # associate differently, so floats agree to fp32 rounding, not bitwise.
                np.testing.assert_allclose(b[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
            else:
                assert b[key] == value, key


@pytest.mark.slow  # two launches, ~2 min; the full-length run below checks the same and more
def test_two_processes_match_one_on_a_short_run(tmp_path):
    finish(_start(tmp_path / "one", tmp_path / "cache", 1, 8, SHORT))
    finish(_start(tmp_path / "two", tmp_path / "cache", 2, 4, SHORT))
    _assert_match(_records(tmp_path / "one"), _records(tmp_path / "two"))


@pytest.mark.slow
def test_two_processes_match_one(one):
    tmp, reference = one
    finish(_start(tmp / "two", tmp / "cache", 2, 4))
    _assert_match(reference, _records(tmp / "two"))


@pytest.mark.slow
def test_sigkill_mid_stage_resumes_with_each_step_once(one):
    tmp, reference = one
    run_dir = tmp / "killed"
    (proc,) = _start(run_dir, tmp / "cache", 1, 8)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 600
    # Killed once step 3 is logged: after the step-2 checkpoint, before the step-4 one.
    while not (metrics.exists() and any(r["kind"] == "train" and r["step"] == 3 for r in read_metrics(metrics))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert [r["step"] for r in read_metrics(metrics) if r["kind"] == "train"][-1] >= 3
    finish(_start(run_dir, tmp / "cache", 1, 8))
    raw = _records(run_dir, dedupe=False)
    assert len({(r["kind"], r["stage"], r["step"]) for r in raw}) == len(raw)  # each step once, on disk
    assert raw == reference


def test_sigterm_inside_a_long_evaluation_leaves_promptly(tmp_path):
    run_dir = tmp_path / "sigterm"
    # A step-0 evaluation of 64 batches: minutes if the signal were only honoured between steps.
    (proc,) = _start(run_dir, tmp_path / "cache", 1, 8, ["eval.num_prompts=256", "eval.batch_prompts=4",
                                                         "eval.max_new_tokens=64"])
    for line in proc.stdout:
        if "stage grpo: starting" in line:
            break
    time.sleep(3)  # inside the evaluation's first batches
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "stopped by signal" in out
    assert time.monotonic() - sent < 60  # within a few batches, not the whole evaluation
    assert read_metrics(run_dir / "metrics.jsonl") == []  # the cut evaluation is not logged: it runs again
