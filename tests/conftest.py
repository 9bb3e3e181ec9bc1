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

