"""The operands of the forward state pass, formed in one Pallas Mosaic GPU kernel (H100).

Per chunk and value head (kda_spec §3.2 C, ``kda_jax.ops.chunked._wy``), with T = (I + L)⁻¹,
Γ = e^G on the rows that read the incoming state (the chunk's first document) and
E = e^{G_end − G} on the rows that write the outgoing one (its last document):

    W = T·Diag(β)(K⊙Γ)      U = T·Diag(β)V      Kd = K⊙E      Qs = s·Q⊙Γ

``forward_factors`` writes the four as bf16, one CTA per (chunk, batch row, head): the decays
are evaluated in registers, Diag(β)(K⊙Γ), Diag(β)V and T are rounded to bf16 into shared
memory and the two products run on the tensor cores with float32 accumulation — the precision
map of kda_spec §3.5 v (fla stores T in the input dtype and forms W, U from bf16 operands).
In XLA the same step was several passes over float32 chunk tensors. Every exponent is ≤ 0 for
log decays (G non-increasing), so −1000 gates stay finite.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kda_jax.kernels import intra
from kda_jax.kernels.blocks import _COL, BLOCK_D
from kda_jax.kernels.state_pass import _BF16, _F32, _ROW, _WG, _mm, _tiled, check_operand


_check = functools.partial(check_operand, "forward_factors")


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def forward_factors(q, k, v, G, beta, T, reads, writes, *, scale, interpret=False):
    """``(W, U, Kd, Qs)`` bf16 (module docstring) from chunk-major ``q, k [N, B, H, C, K]``,
    ``v [N, B, H, C, V]`` (bf16 or float32, one dtype), float32 ``G [N, B, H, C, K]``,
    ``beta [N, B, H, C]``, ``T [N, B, H, C, C]`` and the row masks ``reads, writes [N, B, C]``
    (1.0 where a row reads / writes the state across the chunk boundary, else 0.0)."""
    N, B, H, C, K = k.shape
    V = v.shape[-1]
    dts = (jnp.bfloat16, jnp.float32)
    for name, x, shape, dt in (("k", k, (N, B, H, C, K), dts), ("q", q, (N, B, H, C, K), (k.dtype,)),
                               ("v", v, (N, B, H, C, V), (k.dtype,)), ("G", G, (N, B, H, C, K), (_F32,)),
                               ("beta", beta, (N, B, H, C), (_F32,)), ("T", T, (N, B, H, C, C), (_F32,)),
                               ("reads", reads, (N, B, C), (_F32,)), ("writes", writes, (N, B, C), (_F32,))):
        _check(name, x, shape, dt)
    if C % 64 or K % BLOCK_D or V % BLOCK_D:
        raise ValueError(f"forward_factors needs C a multiple of 64 and K, V of {BLOCK_D}; got C={C} K={K} V={V}")

    def body(q_ref, k_ref, v_ref, g_ref, b_ref, t_ref, r_ref, w_ref, w_out, u_out, kd_out, qs_out, t_s, kb_s, vb_s):
        n, b, h = lax.axis_index("n"), lax.axis_index("b"), lax.axis_index("h")
        idx = (n, b, h)
        rows = lambda x, cols: lax.broadcast_in_dim(x, (C, cols), [0])
        beta_ = rows(plgpu.load(b_ref.at[idx], layout=_ROW, optimized=False), BLOCK_D)
        reads_ = rows(plgpu.load(r_ref.at[n, b], layout=_ROW, optimized=False), BLOCK_D) > 0
        writes_ = rows(plgpu.load(w_ref.at[n, b], layout=_ROW, optimized=False), BLOCK_D) > 0
        t_s[...] = plgpu.load(t_ref.at[idx], layout=_WG, optimized=False).astype(_BF16)
        for cb in range(V // BLOCK_D):
            cs = pl.ds(cb * BLOCK_D, BLOCK_D)
            vx = plgpu.load(v_ref.at[idx].at[:, cs], layout=_WG, optimized=False).astype(_F32)
            vb_s.at[cb][...] = (beta_ * vx).astype(_BF16)
        for cb in range(K // BLOCK_D):
            cs = pl.ds(cb * BLOCK_D, BLOCK_D)
            load = lambda ref: plgpu.load(ref.at[idx].at[:, cs], layout=_WG, optimized=False).astype(_F32)
            g, kx, qx = load(g_ref), load(k_ref), load(q_ref)
            gend = lax.broadcast_in_dim(plgpu.load(g_ref.at[idx].at[C - 1, cs], layout=_COL, optimized=False),
                                        (C, BLOCK_D), [1])
            gamma = jnp.where(reads_, jnp.exp(g), 0.0)
            decay = jnp.where(writes_, jnp.exp(jnp.minimum(gend - g, 0.0)), 0.0)
            kb_s.at[cb][...] = (beta_ * kx * gamma).astype(_BF16)
            kd_out.at[idx].at[:, cs][...] = (kx * decay).astype(_BF16)
            qs_out.at[idx].at[:, cs][...] = (scale * qx * gamma).astype(_BF16)
        plgpu.commit_smem()
        # one column block of W (U) per product: W[:, block] = T · Kb[:, block]
        for out_ref, src, width in ((w_out, kb_s, K), (u_out, vb_s, V)):
            for cb in range(width // BLOCK_D):
                out_ref.at[idx].at[:, pl.ds(cb * BLOCK_D, BLOCK_D)][...] = _mm((C, BLOCK_D), (t_s, src.at[cb])).astype(_BF16)

    out = (jax.ShapeDtypeStruct((N, B, H, C, K), _BF16), jax.ShapeDtypeStruct((N, B, H, C, V), _BF16),
           jax.ShapeDtypeStruct((N, B, H, C, K), _BF16), jax.ShapeDtypeStruct((N, B, H, C, K), _BF16))
    scratch = [_tiled((C, C)), _tiled((K // BLOCK_D, C, BLOCK_D)), _tiled((V // BLOCK_D, C, BLOCK_D))]
    kern = intra._kernel(body, name="kda_forward_factors", interpret=interpret, grid=(N, B, H),
                         grid_names=("n", "b", "h"), out_type=out, scratch_types=scratch)
    return kern(q, k, v, G, beta, T, reads, writes)
