"""Tests run on CPU with 8 fake devices; this must happen before JAX starts."""
import os

os.environ["JAX_PLATFORMS"] = "cpu"
# The suite is compile-bound (hundreds of small programs): LLVM's -O0 code generation halves the compile time of
# XLA's CPU backend (a distillation step's tests: 100 s -> 54 s) and changes no float semantics (XLA's own HLO
# passes still run; reassociation stays off). Child processes that tests start pass it on too.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {FAST_COMPILE}"
).strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared")
GSM8K_DIR = os.path.normpath(os.path.join(SHARED, "data", "gsm8k"))


def start_training(args: list[str], n_proc: int, devices_each: int, *, cwd: str):
    """`python -m r1jax train *args` as `n_proc` processes of `devices_each` CPU devices each (gloo, one
    coordinator port when more than one); returns the Popen objects, stdout and stderr merged."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = []
    for i in range(n_proc):
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each} {FAST_COMPILE}"}
        if n_proc > 1:
            env.update(R1JAX_COORDINATOR=f"localhost:{port}", R1JAX_NUM_PROCESSES=str(n_proc),
                       R1JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen([sys.executable, "-m", "r1jax", "train", *args], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs, timeout: int = 900) -> list[str]:
    """Wait for every process; each must exit 0 (else its output's tail is the failure). Returns the outputs."""
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs
