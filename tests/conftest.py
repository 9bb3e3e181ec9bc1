"""Tests run on CPU with 8 fake devices; this must happen before JAX starts."""
import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared")
GSM8K_DIR = os.path.normpath(os.path.join(SHARED, "data", "gsm8k"))
