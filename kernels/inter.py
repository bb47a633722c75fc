"""The backward's parts that come through the chunk states, in one Pallas Mosaic GPU kernel (H100).

Per chunk and value head (kda_spec §4.2 step 2, ``kda_jax.ops.chunked.ScanPasses.inter_adjoint``),
from the cotangent dO, the state h entering the chunk, Vn and dSn (the gradient of the state
leaving it), with Γ = e^G on the rows that read the incoming state and E = e^{G_end − G} on the
rows that write the outgoing one:

    dq = s·(dO·hᵀ)⊙Γ      dk = (Vn·dSnᵀ)⊙E      dG = Q⊙dq − K⊙dk      dP = s·dO·Vnᵀ

plus, on the chunk's last row of dG, the state decay's part Σ_v h⊙dSn·gend + Σ_i K⊙dk (gend the
state's decay over the chunk, zero where a document starts inside it); dP is kept on and below the
diagonal, per document. ``inter_adjoint`` runs one CTA per (chunk, batch row, head): dO, Vn, h and
dSn as bf16 tiles in shared memory (96 KB at K = V = 128), the products on the tensor cores with
float32 accumulation — the XLA GEMMs on bf16 operands read the same roundings — and Σ_v h⊙dSn as the
diagonal of h·dSnᵀ, one more product per column block, so the sum lands in the layout of dG's columns.
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


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def inter_adjoint(q, k, G, gend, dO, h, Vn, dSn, reads, writes, zone, *, scale, interpret=False):
    """``(dq, dk, dG [N,B,H,C,K], dP [N,B,H,C,C])``, all float32 (module docstring), from ``q, k``
    (bf16 or float32, one dtype; chunk-major ``[N, B, H, C, K]`` or both time-major ``[B, N·C, H, K]``),
    float32 chunk-major ``G [N, B, H, C, K]`` and ``gend [N, B, H, K]``, ``dO, Vn [N, B, H, C, V]``,
    ``h, dSn [N, B, H, K, V]`` (bf16 or float32 each), the row masks ``reads, writes [N, B, C]``
    (1.0 where a row reads / writes the state across the chunk boundary) and each row's document
    ``zone [N, B, C]`` (float32 counts)."""
    N, B, H, C, K = G.shape
    V = dO.shape[-1]
    dts = (_BF16, _F32)
    layout = (N, B, H, C) if k.ndim == 5 else (B, N * C, H)
    for name, x, shape, dt in (("k", k, (*layout, K), dts), ("q", q, (*layout, K), (k.dtype,)),
                               ("G", G, (N, B, H, C, K), (_F32,)), ("gend", gend, (N, B, H, K), (_F32,)),
                               ("dO", dO, (N, B, H, C, V), dts), ("h", h, (N, B, H, K, V), dts),
                               ("Vn", Vn, (N, B, H, C, V), dts), ("dSn", dSn, (N, B, H, K, V), dts),
                               ("reads", reads, (N, B, C), (_F32,)), ("writes", writes, (N, B, C), (_F32,)),
                               ("zone", zone, (N, B, C), (_F32,))):
        check_operand("inter_adjoint", name, x, shape, dt)
    if C != 64 or K % BLOCK_D or V % BLOCK_D:
        raise ValueError(f"inter_adjoint needs C = 64 and K, V multiples of {BLOCK_D}; got C={C} K={K} V={V}")
    nk, nv = K // BLOCK_D, V // BLOCK_D
    blk = lambda i: pl.ds(i * BLOCK_D, BLOCK_D)

    def body(q_ref, k_ref, g_ref, ge_ref, do_ref, h_ref, vn_ref, ds_ref, r_ref, w_ref, z_ref,
             dq_out, dk_out, dg_out, dp_out, do_s, vn_s, h_s, ds_s):
        n, b, hd = lax.axis_index("n"), lax.axis_index("b"), lax.axis_index("h")
        idx = (n, b, hd)
        load = lambda ref: plgpu.load(ref, layout=_WG, optimized=False).astype(_F32)
        rows = lambda x: lax.broadcast_in_dim(x, (C, BLOCK_D), [0])
        cols = lambda x: lax.broadcast_in_dim(x, (C, BLOCK_D), [1])
        reads_ = rows(plgpu.load(r_ref.at[n, b], layout=_ROW, optimized=False)) > 0
        writes_ = rows(plgpu.load(w_ref.at[n, b], layout=_ROW, optimized=False)) > 0
        for j in range(nv):
            do_s.at[j][...] = load(do_ref.at[idx].at[:, blk(j)]).astype(_BF16)
            vn_s.at[j][...] = load(vn_ref.at[idx].at[:, blk(j)]).astype(_BF16)
            for i in range(nk):
                h_s.at[i, j][...] = load(h_ref.at[idx].at[blk(i), blk(j)]).astype(_BF16)
                ds_s.at[i, j][...] = load(ds_ref.at[idx].at[blk(i), blk(j)]).astype(_BF16)
        plgpu.commit_smem()
        last = plgpu.broadcasted_iota(jnp.int32, (C, BLOCK_D), 0, layout=_WG) == C - 1
        diag = plgpu.broadcasted_iota(jnp.int32, (BLOCK_D, BLOCK_D), 0, layout=_WG) == plgpu.broadcasted_iota(
            jnp.int32, (BLOCK_D, BLOCK_D), 1, layout=_WG)
        for i in range(nk):  # column block i of dq, dk, dG (rows i of h and dSn)
            g = load(g_ref.at[idx].at[:, blk(i)])
            g_end = cols(plgpu.load(g_ref.at[idx].at[C - 1, blk(i)], layout=_COL, optimized=False))
            gamma = jnp.where(reads_, jnp.exp(g), 0.0)
            decay = jnp.where(writes_, jnp.exp(jnp.minimum(g_end - g, 0.0)), 0.0)
            dq = scale * gamma * _mm((C, BLOCK_D), *((do_s.at[j], h_s.at[i, j].T) for j in range(nv)))
            dk = decay * _mm((C, BLOCK_D), *((vn_s.at[j], ds_s.at[i, j].T) for j in range(nv)))
            qx, kx = load(chunk(q_ref, idx, C).at[:, blk(i)]), load(chunk(k_ref, idx, C).at[:, blk(i)])
            # Σ_v h⊙dSn for the rows i of h: the diagonal of h[i]·dSn[i]ᵀ, summed down its columns
            hds = _mm((BLOCK_D, BLOCK_D), *((h_s.at[i, j], ds_s.at[i, j].T) for j in range(nv)))
            carry = jnp.sum(jnp.where(diag, hds, 0.0), axis=0)
            state = carry * plgpu.load(ge_ref.at[idx].at[blk(i)], layout=_COL, optimized=False) + jnp.sum(kx * dk, 0)
            dq_out.at[idx].at[:, blk(i)][...] = dq
            dk_out.at[idx].at[:, blk(i)][...] = dk
            dg_out.at[idx].at[:, blk(i)][...] = qx * dq - kx * dk + jnp.where(last, cols(state), 0.0)
        dp = scale * _mm((C, C), *((do_s.at[j], vn_s.at[j].T) for j in range(nv)))
        dist = plgpu.broadcasted_iota(jnp.int32, (C, C), 0, layout=_WG) - plgpu.broadcasted_iota(
            jnp.int32, (C, C), 1, layout=_WG)
        same = same_document(z_ref.at[n, b], C)
        dp_out.at[idx][...] = jnp.where((dist >= 0) & same, dp, 0.0)

    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, _F32)
    out = (f32(N, B, H, C, K), f32(N, B, H, C, K), f32(N, B, H, C, K), f32(N, B, H, C, C))
    scratch = [_tiled((nv, C, BLOCK_D)), _tiled((nv, C, BLOCK_D)), _tiled((nk, nv, BLOCK_D, BLOCK_D)),
               _tiled((nk, nv, BLOCK_D, BLOCK_D))]  # 96 KB at K = V = 128
    kern = intra._kernel(body, name="kda_inter_adjoint", interpret=interpret, grid=(N, B, H),
                         grid_names=("n", "b", "h"), out_type=out, scratch_types=scratch)
    return kern(q, k, G, gend, dO, h, Vn, dSn, reads, writes, zone)
