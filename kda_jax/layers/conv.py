"""Causal depthwise short convolution with SiLU (kimi_linear_model §2.2 step 1).

``y[t] = silu(Σ_j weight[j] * x[t - (W-1) + j])``: tap ``W-1`` multiplies the current token,
tap 0 the token ``W-1`` steps back (the HF weight ``[C, 1, W]`` transposed). Inputs before the
start of a document count as zeros, so packed documents never see each other; for decode a
cache holds the last ``W-1`` inputs of each sequence (it belongs to the row's first document).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kda_jax.layers.common import param


def _conv_init(key, shape, dtype):
    width, _ = shape
    bound = width ** -0.5  # PyTorch Conv1d default for a depthwise kernel (fan_in = width)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class ShortConv(nnx.Module):
    def __init__(self, channels: int, width: int = 4, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, axis_name: str = "heads"):
        if width < 1:
            raise ValueError(f"short conv width must be >= 1, got {width}")
        self.channels, self.width, self.dtype = channels, width, dtype
        self.weight = param(rngs, _conv_init, (width, channels), ("conv_width", axis_name), dtype=param_dtype)

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None, cache: jax.Array | None = None,
                 ) -> tuple[jax.Array, jax.Array]:
        """x ``[B, T, C]`` → (y ``[B, T, C]``, new cache ``[B, W-1, C]`` = the last W-1 inputs).

        ``cache`` ``[B, W-1, C]`` holds the inputs before x (zeros when None).
        """
        B, T, C = x.shape
        if C != self.channels:
            raise ValueError(f"ShortConv expects {self.channels} channels, got input {x.shape}")
        P = self.width - 1
        if cache is None:
            cache = jnp.zeros((B, P, C), x.dtype)
        elif cache.shape != (B, P, C):
            raise ValueError(f"conv cache must have shape {(B, P, C)}, got {cache.shape}")
        xp = jnp.concatenate([cache.astype(x.dtype), x], axis=1)  # [B, P + T, C]
        if segment_ids is not None:
            # History positions belong to the row's first document.
            seg = jnp.concatenate([jnp.repeat(segment_ids[:, :1], P, axis=1), segment_ids], axis=1)
        w = self.weight[...].astype(jnp.float32)
        y = jnp.zeros((B, T, C), jnp.float32)
        for j in range(self.width):
            tap = jax.lax.dynamic_slice_in_dim(xp, j, T, axis=1).astype(jnp.float32)
            if segment_ids is not None and j < P:
                same = jax.lax.dynamic_slice_in_dim(seg, j, T, axis=1) == segment_ids
                tap = jnp.where(same[..., None], tap, 0.0)
            y = y + tap * w[j]
        new_cache = xp[:, T:, :] if P else xp[:, :0, :]
        return jax.nn.silu(y).astype(self.dtype), new_cache
