"""Test-session setup: float64 for the oracles, 8 fake CPU devices for sharding tests."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if not os.environ.get("KDA_TEST_GPU"):  # KDA_TEST_GPU=1 runs the suite on the GPU machine
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
# Pallas Mosaic GPU interpret mode keeps its simulated GPU memory in one process-global object, so
# two interpreted kernels must never run at once; with async CPU dispatch an eagerly dispatched
# kernel can still be running when the next one starts (seen once as a hang under pytest -n 2).
# Set before the CPU backend is created.
jax.config.update("jax_cpu_enable_async_dispatch", False)
