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

Prefill (``MLAttention.prefill``) must not hold ``[B, H, T, T]`` scores or a ``[B, 1, T, T]``
mask: at T = 32K with 16 heads the XLA softmax needs 64 GiB of float32 logits (and the cuDNN
call turns a boolean mask into a dense bias). ``prefill_attention`` keeps memory linear in T:
cuDNN with the left padding hidden by one extra key feature (``_hide_padding_keys``), else a
block-wise online softmax in XLA (``blockwise_attention``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kda_jax.inference.cache import MLACache
from kda_jax.layers.common import Linear, widened
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


# Query/key rows per block of ``blockwise_attention``: [B, H, 512, 512] float32 scores (16 MiB per
# row and head group) are live at a time, whatever T.
ATTN_BLOCK = 512
# Added to the scores of hidden (padding) keys: exp underflows to exactly 0 in float32. A power of
# two, so it is exact in bf16.
_HIDE = 2.0 ** 15


def blockwise_attention(q, k, v, *, scale, segment_ids=None, block=ATTN_BLOCK):
    """``causal_attention`` (impl "xla") in O(T) memory: query blocks one by one (``lax.map``), each
    an online softmax over the key blocks up to its own (a loop of dynamic length, so the masked
    upper triangle costs nothing). Forward only (prefill). q, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]``."""
    B, T, H, _ = q.shape
    Dv = v.shape[-1]
    C = min(block, T)
    n = -(-T // C)
    pad = lambda a: jnp.pad(a, [(0, 0), (0, n * C - T)] + [(0, 0)] * (a.ndim - 2))
    seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    qb, kb, vb, sb = (pad(a).reshape(B, n, C, *a.shape[2:]) for a in (q, k, v, seg))
    idx = jnp.arange(C)

    def one_query_block(i):
        qi, si = qb[:, i], sb[:, i]                                   # [B, C, H, Dk], [B, C]

        def step(j, carry):
            m, l, acc = carry
            s = jnp.einsum("bqhd,bkhd->bhqk", qi, kb[:, j], preferred_element_type=jnp.float32) * scale
            visible = ((i * C + idx)[:, None] >= (j * C + idx)[None, :])[None, None] \
                & (si[:, :, None] == sb[:, j][:, None, :])[:, None]
            s = jnp.where(visible, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)      # rows with nothing visible yet
            p = jnp.exp(s - m_safe[..., None])
            corr = jnp.exp(m - m_safe)
            pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(v.dtype), vb[:, j], preferred_element_type=jnp.float32)
            return m_new, l * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv

        init = (jnp.full((B, H, C), -jnp.inf, jnp.float32), jnp.zeros((B, H, C), jnp.float32),
                jnp.zeros((B, H, C, Dv), jnp.float32))
        _, l, acc = jax.lax.fori_loop(0, i + 1, step, init)
        return (acc / l[..., None]).transpose(0, 2, 1, 3)             # [B, C, H, Dv]; l > 0: own key

    o = jax.lax.map(one_query_block, jnp.arange(n))                   # [n, B, C, H, Dv]
    return o.transpose(1, 0, 2, 3, 4).reshape(B, n * C, H, Dv)[:, :T].astype(v.dtype)


def _hide_padding_keys(q, k, segment_ids):
    """One extra feature per head: 1 in every query, −2¹⁵ in the keys outside each row's last
    document (0 elsewhere), so their scores drop by ≥ 2¹⁵·scale ≥ 2048 (head dim ≤ 256) and their
    softmax weight is exactly 0. Causal attention over the result is causal attention masked to
    the last document for that document's queries, with no mask tensor (cuDNN turns masks into a
    dense ``[B, 1, T, T]`` bias). Queries of earlier documents (a prefill's left padding) get
    finite, meaningless outputs. The head dim grows to the next multiple of 8 (zeros), as cuDNN
    requires."""
    Dk = q.shape[-1]
    width = -(-(Dk + 1) // 8) * 8 - Dk
    hidden = (segment_ids != segment_ids[:, -1:])[:, :, None]          # [B, T, 1]: over heads
    q_extra = jnp.zeros(q.shape[:-1] + (width,), q.dtype).at[..., 0].set(1)
    k_extra = jnp.zeros(k.shape[:-1] + (width,), k.dtype).at[..., 0].set(jnp.where(hidden, -_HIDE, 0))
    return jnp.concatenate([q, q_extra], -1), jnp.concatenate([k, k_extra], -1)


def prefill_attention(q, k, v, *, scale, segment_ids=None, impl="auto"):
    """Causal attention for prefill in memory linear in T, exact for the queries of each row's last
    document (the prompt; with ``segment_ids`` None, every query).

    cuDNN flash attention where ``causal_attention`` would use it and the key-hiding feature fits
    its head-dim limit; otherwise ``blockwise_attention`` (any segment ids, exact everywhere).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if _use_cudnn(impl, q) and q.shape[-1] + 8 <= 256:
        if segment_ids is not None:
            q, k = _hide_padding_keys(q, k, segment_ids)
        return causal_attention(q, k, v, scale=scale, impl="cudnn")
    return blockwise_attention(q, k, v, scale=scale, segment_ids=segment_ids)


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
        """``__call__`` on the prompt (expanded attention, ``prefill_attention``: memory linear in T)
        that also writes the latent cache, ``max_len`` slots (the prompt's latents in the first T,
        zeros after). Outputs are exact for each row's last document (its prompt); positions of
        earlier documents (left padding) are finite but meaningless."""
        B, T, _ = x.shape
        if T > max_len:
            raise ValueError(f"the prompt ({T} tokens) is longer than the cache ({max_len})")
        q, c, k_pe = self.project(x, positions)
        k, v = self.expand(c, k_pe)
        o = prefill_attention(q, k, v, scale=self.scale, segment_ids=segment_ids, impl=self.impl)
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
        w = self.kv_b_proj.kernel[...].astype(self.dtype).reshape(self.kv_lora_rank, self.num_heads, -1)
        w_uk, w_uv = w[..., :self.nope], w[..., self.nope:]
        # Every product runs in its operands' dtype with float32 accumulation. The cache is read in
        # its own dtype (the small operands are cast to it): casting the [B, max_len, 512] latent to
        # float32 would write and re-read a float32 copy of the whole cache every step (17.5 GiB at
        # batch 35 and 256K slots on an H100).
        mm = dict(preferred_element_type=jnp.float32)

        def per_head(spec, a_bshx, w_rhy):  # B*S rows per head; one row runs as GEMM_ROWS (common.py)
            a = widened(a_bshx.astype(self.dtype).reshape(B * S, *a_bshx.shape[2:]))
            return jnp.einsum(spec, a, w_rhy, **mm)[:B * S].reshape(B, S, *a_bshx.shape[2:-1], -1)

        q_lat = per_head("mhn,rhn->mhr", q[..., :self.nope], w_uk)
        scores = (jnp.einsum("bshr,btr->bsht", q_lat.astype(latent.dtype), latent, **mm)
                  + jnp.einsum("bshp,btp->bsht", q[..., self.nope:].astype(kpe.dtype), kpe, **mm)) * self.scale
        slot = jnp.arange(latent.shape[1])
        valid = (slot[None, None, :] >= start[:, None, None]) & (slot[None, None, :] <= pos + jnp.arange(S)[None, :, None])
        p = jax.nn.softmax(jnp.where(valid[:, :, None, :], scores, -jnp.inf), axis=-1)
        o = per_head("mhr,rhv->mhv", jnp.einsum("bsht,btr->bshr", p.astype(latent.dtype), latent, **mm), w_uv)
        y = self.o_proj(o.astype(self.dtype).reshape(B, S, self.num_heads * self.v_dim))
        return y, MLACache(latent=latent, k_pe=kpe)
