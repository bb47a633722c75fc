"""Test-session setup: float64 for the oracles, 8 fake CPU devices for sharding tests."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu") if not os.environ.get("KDA_TEST_GPU") else None

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
