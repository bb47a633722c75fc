"""Parameters with logical axis names, and the one linear layer every module uses.

Every parameter carries its logical axis names (``out_sharding`` metadata, resolved to mesh
axes by ``kda_jax.models.sharding``) and is created without eager sharding, so modules build
the same way on one CPU, under ``jax.eval_shape`` and inside a sharded, jitted init.
Parameters that must not be weight-decayed (norm weights, A_log, dt_bias, ...) carry
``no_decay=True``; the optimiser reads it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

default_kernel_init = nnx.initializers.normal(stddev=0.02)  # HF initializer_range


def param(rngs: nnx.Rngs, init, shape, axes, *, dtype=jnp.float32, no_decay=False) -> nnx.Param:
    """An ``nnx.Param`` initialised by ``init(key, shape, dtype)`` with logical ``axes``."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match the parameter shape {shape}")
    value = init(rngs.params(), tuple(shape), dtype)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False, no_decay=no_decay)


# Rows a one-row product is widened to. XLA's GPU compiler rewrites a dot whose one operand is a
# single row (size-1 dimensions dropped) and whose other operand is small (under ~10M elements)
# into multiply + reduce; against a weight matrix that is a column reduction, which read bf16
# weights at ~0.42 TB/s on an H100, where the same product as an 8-row GEMM ran at ~2.4 TB/s
# (benchmarks/NOTES.md, "MoE decode"). Decoding one sequence makes every projection such a
# product; the repeated rows cost no extra bandwidth.
GEMM_ROWS = 8


def widened(x: jax.Array) -> jax.Array:
    """x ``[1, ...]`` → ``[GEMM_ROWS, ...]`` (the row repeated); any other x unchanged. The caller
    keeps the product's first ``x.shape[0]`` rows."""
    return jnp.broadcast_to(x, (GEMM_ROWS, *x.shape[1:])) if x.shape[0] == 1 else x


def ones_init(key, shape, dtype):
    del key
    return jnp.ones(shape, dtype)


class Linear(nnx.Module):
    """``y = x @ kernel`` with kernel ``[in, out]`` (a PyTorch Linear weight transposed), no bias.

    The matmul runs in ``dtype`` (the compute dtype) with float32 accumulation; a single row
    (one token of one sequence) runs as a ``GEMM_ROWS``-row product.
    """

    def __init__(self, in_features: int, out_features: int, axes: tuple[str | None, str | None], *,
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32, kernel_init=default_kernel_init):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.kernel = param(rngs, kernel_init, (in_features, out_features), axes, dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear expects inputs with last dimension {self.in_features}, got {x.shape}")
        x, w = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
        if math.prod(x.shape[:-1]) == 1:
            y = jnp.einsum("mi,io->mo", widened(x.reshape(1, -1)), w, preferred_element_type=jnp.float32)
            return y[:1].reshape(*x.shape[:-1], -1).astype(self.dtype)
        return jnp.einsum("...i,io->...o", x, w, preferred_element_type=jnp.float32).astype(self.dtype)
