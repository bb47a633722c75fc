"""Test-session setup: float64 for the oracles, 8 fake CPU devices for sharding tests, quick CPU compiles."""

import os

import pytest

# The CPU backend's LLVM optimisation level 0: the suite's time is mostly XLA compiling small programs
# once, and at level 0 compiling takes about half as long (test_sharded_step_equals_single_device_step
# 63 → 37 s, test_float64_is_exact 18 → 10 s); without fast math the arithmetic is IEEE at any level,
# and every bit-for-bit comparison in the suite is between runs under the same flags.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
if not os.environ.get("KDA_TEST_GPU"):  # KDA_TEST_GPU=1 runs the suite on the GPU machine
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
# Pallas Mosaic GPU interpret mode keeps its simulated GPU memory in one process-global object, so
# two interpreted kernels must never run at once; with async CPU dispatch an eagerly dispatched
# kernel can still be running when the next one starts (seen once as a hang under pytest -n 2).
# Set before the CPU backend is created.
jax.config.update("jax_cpu_enable_async_dispatch", False)


@pytest.fixture(scope="session")
def text_run(tmp_path_factory):
    """One uninterrupted training run on a small text corpus (``tests.train.test_loop.make_text_run``),
    shared by the tests that read a trained workdir; they share the xdist group ``text_run``, so
    ``make test`` (``--dist loadgroup``) trains it once."""
    from tests.train.test_loop import make_text_run

    return make_text_run(tmp_path_factory.mktemp("text_run"))
