"""Multi-head latent attention, NoPE by default (kimi_linear_model §2.3).

Per head the query is ``[q_nope (qk_nope_head_dim) ; q_pe (qk_rope_head_dim)]`` and the key is
``[k_nope_h ; k_pe]``, where ``[c ; k_pe] = kv_a_proj_with_mqa(x)``: a ``kv_lora_rank`` latent c
(RMS-normalised, then expanded by ``kv_b_proj`` into per-head ``[k_nope ; v]``) and one shared
``qk_rope_head_dim`` key part for all heads. Softmax scale ``1/sqrt(qk_nope + qk_rope)``.
Kimi Linear never rotates the "rope" dims (``use_rope=False``); ``use_rope=True`` applies
rotate-half RoPE at the given positions for the paper's RoPE ablation.

Attention is causal and, with segment ids, block-diagonal over packed documents. On GPU with
bf16/fp16 inputs it runs cuDNN flash attention (V zero-padded to the q/k head dim and the output
sliced back) — on a single device: under a multi-device mesh "auto" uses XLA, because jit's
partitioning of the cuDNN call failed there (measured on 2 H100s); elsewhere the XLA softmax with
float32 logits. Both compute the same function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kda_jax.inference.cache import MLACache
from kda_jax.layers.common import Linear
from kda_jax.layers.norms import RMSNorm

ATTENTION_IMPLS = ("auto", "xla", "cudnn")


def _use_cudnn(impl, q):
    """cuDNN for "auto" only where it was checked: one GPU (under a multi-device mesh, jit's
    partitioning of the cuDNN call failed on 2 H100s, so "auto" takes the XLA path there)."""
    if impl == "cudnn":
        return True
    mesh = jax.sharding.get_abstract_mesh()
    single = mesh.empty or mesh.size == 1
    return (impl == "auto" and single and jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256)


def causal_attention(q, k, v, *, scale, segment_ids=None, impl="auto"):
    """Causal (and segment-masked) attention. q, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]``."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    if _use_cudnn(impl, q):
        vp = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, Dk - Dv))) if Dv < Dk else v
        o = jax.nn.dot_product_attention(q, k, vp.astype(q.dtype), mask=mask, scale=scale, is_causal=True,
                                         implementation="cudnn")
        return o[..., :Dv]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    pos = jnp.arange(T)
    visible = (pos[:, None] >= pos[None, :])[None, None]
    if mask is not None:
        visible = visible & mask
    logits = jnp.where(visible, logits, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(v.dtype)


def apply_rope(x, positions, theta):
    """Rotate-half RoPE over the last axis of x ``[B, T, H, D]`` at ``positions [B, T]``."""
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    ang = positions.astype(jnp.float32)[:, :, None, None] * freq
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class MLAttention(nnx.Module):
    def __init__(self, hidden: int, num_heads: int, *, rngs: nnx.Rngs, kv_lora_rank: int = 512,
                 q_lora_rank: int | None = None, qk_nope_head_dim: int = 128, qk_rope_head_dim: int = 64,
                 v_head_dim: int = 128, norm_eps: float = 1e-6, use_rope: bool = False, rope_theta: float = 10000.0,
                 impl: str = "auto", dtype=jnp.float32, param_dtype=jnp.float32):
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"MLAttention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
        if use_rope and qk_rope_head_dim % 2:
            raise ValueError(f"RoPE needs an even qk_rope_head_dim, got {qk_rope_head_dim}")
        self.hidden, self.num_heads = hidden, num_heads
        self.kv_lora_rank, self.q_lora_rank = kv_lora_rank, q_lora_rank
        self.nope, self.rope, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.use_rope, self.rope_theta, self.impl, self.dtype = use_rope, rope_theta, impl, dtype
        self.scale = (qk_nope_head_dim + qk_rope_head_dim) ** -0.5
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        q_width = num_heads * (qk_nope_head_dim + qk_rope_head_dim)
        if q_lora_rank:
            self.q_a_proj = Linear(hidden, q_lora_rank, ("embed", "q_lora"), **kw)
            self.q_a_layernorm = RMSNorm(q_lora_rank, eps=norm_eps, rngs=rngs, param_dtype=param_dtype)
            self.q_b_proj = Linear(q_lora_rank, q_width, ("q_lora", "heads"), **kw)
        else:
            self.q_proj = Linear(hidden, q_width, ("embed", "heads"), **kw)
        self.kv_a_proj_with_mqa = Linear(hidden, kv_lora_rank + qk_rope_head_dim, ("embed", "kv_lora"), **kw)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, eps=norm_eps, rngs=rngs, param_dtype=param_dtype)
        self.kv_b_proj = Linear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), ("kv_lora", "heads"), **kw)
        self.o_proj = Linear(num_heads * v_head_dim, hidden, ("heads", "embed"), **kw)

    def project(self, x, positions):
        """Queries ``[B, T, H, nope+rope]``, the normalised latent c ``[B, T, kv_lora]`` and k_pe ``[B, T, rope]``."""
        B, T, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        q = q.reshape(B, T, self.num_heads, self.nope + self.rope)
        ckv = self.kv_a_proj_with_mqa(x)
        c, k_pe = ckv[..., :self.kv_lora_rank], ckv[..., self.kv_lora_rank:]
        c = self.kv_a_layernorm(c)
        if self.use_rope:
            q = jnp.concatenate([q[..., :self.nope], apply_rope(q[..., self.nope:], positions, self.rope_theta)], -1)
            k_pe = apply_rope(k_pe[:, :, None, :], positions, self.rope_theta)[:, :, 0, :]
        return q, c, k_pe

    def expand(self, c, k_pe):
        """Per-head keys ``[B, T, H, nope+rope]`` and values ``[B, T, H, v]`` from the latent."""
        B, T, _ = c.shape
        kv = self.kv_b_proj(c).reshape(B, T, self.num_heads, self.nope + self.v_dim)
        k_nope, v = kv[..., :self.nope], kv[..., self.nope:]
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe[:, :, None, :], (B, T, self.num_heads, self.rope))], -1)
        return k, v

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
                 ) -> jax.Array:
        """x ``[B, T, hidden]`` (already normalised) → ``[B, T, hidden]``."""
        if x.ndim != 3 or x.shape[-1] != self.hidden:
            raise ValueError(f"MLAttention expects x of shape [B, T, {self.hidden}], got {x.shape}")
        B, T, _ = x.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        q, c, k_pe = self.project(x, positions)
        k, v = self.expand(c, k_pe)
        o = causal_attention(q, k, v, scale=self.scale, segment_ids=segment_ids, impl=self.impl)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.v_dim))

    def prefill(self, x: jax.Array, segment_ids: jax.Array | None, positions: jax.Array, max_len: int,
                cache_dtype=jnp.bfloat16) -> tuple[jax.Array, MLACache]:
        """``__call__`` on the prompt (expanded attention) that also writes the latent cache,
        ``max_len`` slots (the prompt's latents in the first T, zeros after)."""
        B, T, _ = x.shape
        if T > max_len:
            raise ValueError(f"the prompt ({T} tokens) is longer than the cache ({max_len})")
        q, c, k_pe = self.project(x, positions)
        k, v = self.expand(c, k_pe)
        o = causal_attention(q, k, v, scale=self.scale, segment_ids=segment_ids, impl=self.impl)
        pad = lambda a: jnp.pad(a.astype(cache_dtype), ((0, 0), (0, max_len - T), (0, 0)))
        return self.o_proj(o.reshape(B, T, self.num_heads * self.v_dim)), MLACache(latent=pad(c), k_pe=pad(k_pe))

    def decode(self, x: jax.Array, cache: MLACache, start: jax.Array, pos: jax.Array, positions: jax.Array,
               ) -> tuple[jax.Array, MLACache]:
        """Absorbed attention of S new tokens over the cache (kimi_linear_model §3).

        ``W_UK`` is folded into the query and ``W_UV`` applied after, so the keys and values are
        the cached 576-wide rows themselves (one KV head shared by all query heads). The new
        tokens go to slots ``pos … pos + S − 1``; row b attends to slots ``start[b] …`` up to itself.
        """
        B, S, _ = x.shape
        q, c, k_pe = self.project(x, positions)
        latent = jax.lax.dynamic_update_slice_in_dim(cache.latent, c.astype(cache.latent.dtype), pos, axis=1)
        kpe = jax.lax.dynamic_update_slice_in_dim(cache.k_pe, k_pe.astype(cache.k_pe.dtype), pos, axis=1)
        w = self.kv_b_proj.kernel[...].astype(jnp.float32).reshape(self.kv_lora_rank, self.num_heads, -1)
        w_uk, w_uv = w[..., :self.nope], w[..., self.nope:]
        f32 = lambda a: a.astype(jnp.float32)
        q_lat = jnp.einsum("bshn,rhn->bshr", f32(q[..., :self.nope]), w_uk)
        scores = (jnp.einsum("bshr,btr->bsht", q_lat, f32(latent))
                  + jnp.einsum("bshp,btp->bsht", f32(q[..., self.nope:]), f32(kpe))) * self.scale
        slot = jnp.arange(latent.shape[1])
        valid = (slot[None, None, :] >= start[:, None, None]) & (slot[None, None, :] <= pos + jnp.arange(S)[None, :, None])
        p = jax.nn.softmax(jnp.where(valid[:, :, None, :], scores, -jnp.inf), axis=-1)
        o = jnp.einsum("bshr,rhv->bshv", jnp.einsum("bsht,btr->bshr", p, f32(latent)), w_uv)
        y = self.o_proj(o.astype(self.dtype).reshape(B, S, self.num_heads * self.v_dim))
        return y, MLACache(latent=latent, k_pe=kpe)
