"""Two processes with 4 CPU devices each (gloo) train like one process with 8."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from r1jax.metrics import read_metrics
from test_r1_zero import TIMING, TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(run_dir, cache, n_proc, devices_each):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "r1jax", "train", "--recipe", "r1_zero", *TINY,
            f"run_dir={run_dir}", f"base.cache_dir={cache}"]
    procs = []
    for i in range(n_proc):
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each}"}
        if n_proc > 1:
            env.update(R1JAX_COORDINATOR=f"localhost:{port}", R1JAX_NUM_PROCESSES=str(n_proc),
                       R1JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return [{k: v for k, v in r.items() if k not in TIMING}
            for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    cache = tmp_path / "cache"
    one = _launch(tmp_path / "one", cache, 1, 8)  # also builds the shared base-model cache
    two = _launch(tmp_path / "two", cache, 2, 4)
    assert [(r["kind"], r["step"]) for r in one] == [(r["kind"], r["step"]) for r in two]
    for a, b in zip(one, two):
        for key, value in a.items():
            if isinstance(value, float):
                # Same programs over the same 8-device mesh; cross-process reductions may
                # associate differently, so floats agree to fp32 rounding, not bitwise.
                np.testing.assert_allclose(b[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
            else:
                assert b[key] == value, key
