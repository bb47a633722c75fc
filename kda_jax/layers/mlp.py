"""SwiGLU feed-forward block: ``down(silu(gate(x)) * up(x))``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kda_jax.layers.common import Linear


class SwiGLU(nnx.Module):
    """The dense MLP of the first layers and the shared experts (HF ``gate/up/down_proj``)."""

    def __init__(self, hidden: int, intermediate: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, mlp_axis: str = "mlp"):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = Linear(hidden, intermediate, ("embed", mlp_axis), **kw)
        self.up_proj = Linear(hidden, intermediate, ("embed", mlp_axis), **kw)
        self.down_proj = Linear(intermediate, hidden, (mlp_axis, "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
