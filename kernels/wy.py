"""The operands of the forward state pass, and their adjoint, each in one Pallas Mosaic GPU kernel (H100).

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

``wy_adjoint`` is the backward through the same step (kda_spec §4.2 step 3 and the dT, dL of steps
4–5; ``kda_jax.ops.chunked.ScanPasses.wy_adjoint``): from dVn (the reverse pass) and the chunk
states h,

    dW = −dVn·hᵀ    dKb = Tᵀ·dW    dUb = Tᵀ·dVn    dT = dW·Kbᵀ + dVn·(βV)ᵀ    dL = −Tᵀ·dT·Tᵀ

(dL strictly lower and per document), with dv = β⊙dUb, dβ = Σ dUb⊙V + Σ dKb⊙K⊙Γ and this step's
parts of dk (β Γ⊙dKb) and dG (Kb⊙dKb). One CTA per (chunk, batch row, head) runs the seven
products on the tensor cores from bf16 operands in shared memory (dW, dT and Tᵀ·dT rounded to bf16
on the way, as the XLA GEMMs on bf16 operands round them), so none of these intermediates reaches HBM.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kda_jax.kernels import intra
from kda_jax.kernels.blocks import _COL, BLOCK_D, same_document
from kda_jax.kernels.state_pass import _BF16, _F32, _ROW, _WG, _mm, _tiled, check_operand, chunk


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


@functools.partial(jax.jit, static_argnames=("interpret",))
def wy_adjoint(k, v, G, beta, T, h, dVn, reads, zone, *, interpret=False):
    """``(dv [N,B,H,C,V], dβ [N,B,H,C], dk, dG [N,B,H,C,K], dL [N,B,H,C,C])``, all float32 (module
    docstring), from ``k`` and ``v`` (bf16 or float32, one dtype; chunk-major ``[N, B, H, C, D]`` or
    both time-major ``[B, N·C, H, D]``), float32 chunk-major ``G [N, B, H, C, K]`` and
    ``beta [N, B, H, C]``, ``T [N, B, H, C, C]`` and the chunk states ``h [N, B, H, K, V]`` (bf16 or
    float32), ``dVn [N, B, H, C, V]`` (float32 or bf16), the rows that read the incoming state
    ``reads [N, B, C]`` (1.0 / 0.0) and each row's document ``zone [N, B, C]`` (float32 counts)."""
    N, B, H, C, K = G.shape
    V = dVn.shape[-1]
    dts = (_BF16, _F32)
    layout = (N, B, H, C) if k.ndim == 5 else (B, N * C, H)
    for name, x, shape, dt in (("k", k, (*layout, K), dts), ("v", v, (*layout, V), (k.dtype,)),
                               ("G", G, (N, B, H, C, K), (_F32,)), ("beta", beta, (N, B, H, C), (_F32,)),
                               ("T", T, (N, B, H, C, C), dts), ("h", h, (N, B, H, K, V), dts),
                               ("dVn", dVn, (N, B, H, C, V), dts), ("reads", reads, (N, B, C), (_F32,)),
                               ("zone", zone, (N, B, C), (_F32,))):
        check_operand("wy_adjoint", name, x, shape, dt)
    if C != 64 or K % BLOCK_D or V % BLOCK_D:
        raise ValueError(f"wy_adjoint needs C = 64 and K, V multiples of {BLOCK_D}; got C={C} K={K} V={V}")
    nk, nv = K // BLOCK_D, V // BLOCK_D
    blk = lambda i: pl.ds(i * BLOCK_D, BLOCK_D)

    def body(k_ref, v_ref, g_ref, b_ref, t_ref, h_ref, dvn_ref, r_ref, z_ref,
             dv_out, db_out, dk_out, dg_out, dl_out, t_s, h_s, dvn_s, vb_s, kb_s, dw_s, m_s):
        n, b, hd = lax.axis_index("n"), lax.axis_index("b"), lax.axis_index("h")
        idx = (n, b, hd)
        load = lambda ref: plgpu.load(ref, layout=_WG, optimized=False).astype(_F32)
        rows = lambda x: lax.broadcast_in_dim(x, (C, BLOCK_D), [0])
        beta_ = rows(plgpu.load(b_ref.at[idx], layout=_ROW, optimized=False))
        reads_ = rows(plgpu.load(r_ref.at[n, b], layout=_ROW, optimized=False)) > 0
        t_s[...] = load(t_ref.at[idx]).astype(_BF16)
        for j in range(nv):
            dvn_s.at[j][...] = load(dvn_ref.at[idx].at[:, blk(j)]).astype(_BF16)
            vb_s.at[j][...] = (beta_ * load(chunk(v_ref, idx, C).at[:, blk(j)])).astype(_BF16)
            for i in range(nk):
                h_s.at[i, j][...] = load(h_ref.at[idx].at[blk(i), blk(j)]).astype(_BF16)
        plgpu.commit_smem()
        for i in range(nk):  # dW[:, i] = −dVn·h[i]ᵀ (rows i of h are the columns i of dW)
            dw_s.at[i][...] = (-_mm((C, BLOCK_D), *((dvn_s.at[j], h_s.at[i, j].T) for j in range(nv)))).astype(_BF16)
        plgpu.commit_smem()
        dbeta = jnp.zeros((C, BLOCK_D), _F32)
        for i in range(nk):
            kx, g = load(chunk(k_ref, idx, C).at[:, blk(i)]), load(g_ref.at[idx].at[:, blk(i)])
            gamma = jnp.where(reads_, jnp.exp(g), 0.0)
            kb = beta_ * kx * gamma
            kb_s.at[i][...] = kb.astype(_BF16)
            dkb = _mm((C, BLOCK_D), (t_s.T, dw_s.at[i]))
            dk_out.at[idx].at[:, blk(i)][...] = beta_ * gamma * dkb
            dg_out.at[idx].at[:, blk(i)][...] = kb * dkb
            dbeta = dbeta + dkb * kx * gamma
        for j in range(nv):
            dub = _mm((C, BLOCK_D), (t_s.T, dvn_s.at[j]))
            dv_out.at[idx].at[:, blk(j)][...] = beta_ * dub
            dbeta = dbeta + dub * load(chunk(v_ref, idx, C).at[:, blk(j)])
        db_out.at[idx][...] = jnp.sum(dbeta, axis=1)
        plgpu.commit_smem()  # Kb
        m_s[...] = _mm((C, C), *((dw_s.at[i], kb_s.at[i].T) for i in range(nk)),
                       *((dvn_s.at[j], vb_s.at[j].T) for j in range(nv))).astype(_BF16)  # dT
        plgpu.commit_smem()
        tdt = _mm((C, C), (t_s.T, m_s))  # Tᵀ·dT, read out of the accumulator after the product is done
        m_s[...] = tdt.astype(_BF16)
        plgpu.commit_smem()
        dL = -_mm((C, C), (m_s, t_s.T))
        dist = plgpu.broadcasted_iota(jnp.int32, (C, C), 0, layout=_WG) - plgpu.broadcasted_iota(
            jnp.int32, (C, C), 1, layout=_WG)
        same = same_document(z_ref.at[n, b], C)
        dl_out.at[idx][...] = jnp.where((dist > 0) & same, dL, 0.0)

    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, _F32)
    out = (f32(N, B, H, C, V), f32(N, B, H, C), f32(N, B, H, C, K), f32(N, B, H, C, K), f32(N, B, H, C, C))
    scratch = [_tiled((C, C)), _tiled((nk, nv, BLOCK_D, BLOCK_D)), _tiled((nv, C, BLOCK_D)),
               _tiled((nv, C, BLOCK_D)), _tiled((nk, C, BLOCK_D)), _tiled((nk, C, BLOCK_D)), _tiled((C, C))]  # 112 KB at K = V = 128
    kern = intra._kernel(body, name="kda_wy_adjoint", interpret=interpret, grid=(N, B, H),
                         grid_names=("n", "b", "h"), out_type=out, scratch_types=scratch)
    return kern(k, v, G, beta, T, h, dVn, reads, zone)
