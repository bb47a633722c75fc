"""RMS normalisation, computed in float32: the decoder norms and the KDA output's gated norm.

One function, ``rms_norm``, serves both modules: ``RMSNorm`` normalises the last axis of the
hidden states; ``GatedRMSNorm`` normalises each head's ``head_dim`` values with one weight shared
by all heads and multiplies by an activation of the output gate (kimi_linear_model §2.2 step 6).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kda_jax.layers.common import ones_init, param

GATE_ACTIVATIONS = ("sigmoid", "swish", "none")


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """``weight * x / sqrt(mean(x², last axis) + eps)`` in float32, returned in x.dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-5, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 axis_name: str | None = "norm"):
        self.eps = eps
        self.weight = param(rngs, ones_init, (dim,), (axis_name,), dtype=param_dtype, no_decay=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


class GatedRMSNorm(nnx.Module):
    """``rms_norm(o) * act(gate)`` per head; o and gate ``[..., H, head_dim]``, weight ``[head_dim]``."""

    def __init__(self, head_dim: int, *, activation: str = "sigmoid", eps: float = 1e-5, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        if activation not in GATE_ACTIVATIONS:
            raise ValueError(f"output gate activation must be one of {GATE_ACTIVATIONS}, got {activation!r}")
        self.activation, self.eps = activation, eps
        self.weight = param(rngs, ones_init, (head_dim,), ("head_dim",), dtype=param_dtype, no_decay=True)

    def __call__(self, o: jax.Array, gate: jax.Array | None) -> jax.Array:
        y = rms_norm(o.astype(jnp.float32), self.weight[...], self.eps)
        if self.activation == "sigmoid":
            y = y * jax.nn.sigmoid(gate.astype(jnp.float32))
        elif self.activation == "swish":
            y = y * jax.nn.silu(gate.astype(jnp.float32))
        return y.astype(o.dtype)
