"""Parameters with logical axis names, and the one linear layer every module uses.

Every parameter carries its logical axis names (``out_sharding`` metadata, resolved to mesh
axes by ``kda_jax.models.sharding``) and is created without eager sharding, so modules build
the same way on one CPU, under ``jax.eval_shape`` and inside a sharded, jitted init.
Parameters that must not be weight-decayed (norm weights, A_log, dt_bias, ...) carry
``no_decay=True``; the optimiser reads it.
"""

from __future__ import annotations

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


def ones_init(key, shape, dtype):
    del key
    return jnp.ones(shape, dtype)


class Linear(nnx.Module):
    """``y = x @ kernel`` with kernel ``[in, out]`` (a PyTorch Linear weight transposed), no bias.

    The matmul runs in ``dtype`` (the compute dtype) with float32 accumulation.
    """

    def __init__(self, in_features: int, out_features: int, axes: tuple[str | None, str | None], *,
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32, kernel_init=default_kernel_init):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.kernel = param(rngs, kernel_init, (in_features, out_features), axes, dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear expects inputs with last dimension {self.in_features}, got {x.shape}")
        return jnp.einsum("...i,io->...o", x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                          preferred_element_type=jnp.float32).astype(self.dtype)
