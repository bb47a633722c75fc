"""The diagonal sub-blocks' adjoints of the gated products, bounded rows on the tensor cores (H100).

The backward's counterpart of ``blocks.gated_blocks``' factored diagonal. Per chunk, for the
diagonal 16×16 sub-blocks of dL and dP (kda_jax.ops.chunked, steps 5–6):

    row_s[i] = Σ_j dM_s[i, j] k_j e^{G_i − G_j}                       (s ∈ {L, P})
    col[j]   = Σ_i (dL[i, j] β_i k_i + dP[i, j] q_i) e^{G_i − G_j}     (i, j in one sub-chunk, j ≤ i)

For a row i whose decay since its sub-chunk's first row n stays within ``blocks.SAFE_SPAN`` in
every channel ("bounded", ``blocks.bounded_rows``), e^{G_i − G_j} = e^{G_i − G_n + σ}·e^{G_n − G_j − σ}
with both factors inside e^{±60} for σ = SAFE_SPAN / 2 (j ≤ i is bounded too), so

    row_s = e^{G − G_n + σ} ⊙ (BD(dM_s) · (k ⊙ e^{G_n − G − σ}))
    col   = e^{G_n − G − σ} ⊙ (BD(β dL)ᵀ · (k ⊙ e^{G − G_n + σ}) + BD(dP)ᵀ · (q ⊙ e^{G − G_n + σ}))

with BD the block-diagonal matrices of the bounded rows' entries: four 64 × 64 × 32 wgmmas per
32-channel block (bf16 operands, float32 accumulation). The kernel forms BD(dL), BD(dP) and BD(β dL)
itself from the whole dL and dP (masked in registers, rounded to bf16 into shared memory; the column
products read the last two transposed there), so no block-diagonal copy passes through HBM. The
other rows' entries (Kimi Linear's unbounded gate) come in as bands (``intra.band_adjoint``'s
inputs, zero on bounded rows) and are summed exactly by ``intra.adjoint_sums``; a chunk whose rows
are all bounded skips that part. The anchor is the sub-chunk's first row and σ a constant, so
nothing depends on a later token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kda_jax.kernels import blocks, intra
from kda_jax.kernels.state_pass import _BF16, _F32, _ROW, _WG, _mm, _tiled, check_operand

SIGMA = blocks.SAFE_SPAN / 2  # both factors of a bounded row inside e^{±SAFE_SPAN / 2}

_check = functools.partial(check_operand, "diagonal_adjoint")


@functools.partial(jax.jit, static_argnames=("interpret",))
def diagonal_adjoint(q, k, G, rows, cols, dL, dP, beta, safe_rows, bounded, *, interpret=False):
    """``(row_L, row_P, col)``, each ``[N, B, H, C, K]`` float32 (module docstring), from the operands
    of ``intra.band_adjoint`` (its bands ``rows``, ``cols`` hold the unbounded rows' entries only), the
    whole float32 ``dL, dP [N, B, H, C, C]`` (lower-triangular; only their diagonal sub-blocks' bounded
    rows are read), float32 ``beta [N, B, H, C]``, the bounded rows ``safe_rows [N, B, H, C]`` float32
    (1 or 0) and ``bounded [N, B, H]`` int32 (1 where every row of the chunk is bounded;
    ``blocks.bounded_rows``)."""
    N, B, H, C, K = intra._operands(q, k, G)
    for name, x in (("rows", rows), ("cols", cols)):
        _check(name, x, (N, B, H, 2, intra.SUB, C), (_F32,))
    for name, x in (("dL", dL), ("dP", dP)):
        _check(name, x, (N, B, H, C, C), (_F32,))
    for name, x in (("beta", beta), ("safe_rows", safe_rows)):
        _check(name, x, (N, B, H, C), (_F32,))
    _check("bounded", bounded, (N, B, H), (jnp.int32,))
    nb, nc, w = K // intra.BLOCK_K, C // intra.SUB, intra.BLOCK_K

    def body(q_ref, k_ref, g_ref, r_ref, c_ref, dl_ref, dp_ref, b_ref, sr_ref, ok_ref, rl_ref, rp_ref, col_ref,
             q_s, k_s, g_s, r_s, c_s, bd_s, yk_s, xk_s, xq_s, bar):
        n, b, h = lax.axis_index("n"), lax.axis_index("b"), lax.axis_index("h")
        idx = (n, b, h)
        outs = (rl_ref, rp_ref, col_ref)
        for src, dst in ((r_ref.at[idx], r_s), (c_ref.at[idx], c_s)):
            plgpu.copy_gmem_to_smem(src, dst, bar)
        rw = blocks._Rows(C, w)

        def tiles(cb):  # the column block's G, q, k from global memory, float32
            load = lambda ref: plgpu.load(intra.chunk(ref, idx, C).at[:, pl.ds(cb * w, w)], layout=_WG, optimized=False)
            return tuple(load(ref).astype(_F32) for ref in (g_ref, q_ref, k_ref))

        first = tiles(0)  # in flight with dL and dP below (loads are not moved across the barrier wait)
        # BD(dL), BD(dP), BD(β dL): the bounded rows' entries of the diagonal sub-blocks, j ≤ i
        i = plgpu.broadcasted_iota(jnp.int32, (C, C), 0, layout=_WG)
        j = plgpu.broadcasted_iota(jnp.int32, (C, C), 1, layout=_WG)
        row_vec = lambda ref: lax.broadcast_in_dim(plgpu.load(ref.at[idx], layout=_ROW, optimized=False), (C, C), [0])
        keep = (i // intra.SUB == j // intra.SUB) & (j <= i) & (row_vec(sr_ref) > 0.0)
        dl, dp = (jnp.where(keep, plgpu.load(ref.at[idx], layout=_WG, optimized=False), 0.0)
                  for ref in (dl_ref, dp_ref))
        bd_s.at[0][...] = dl.astype(_BF16)
        bd_s.at[1][...] = dp.astype(_BF16)
        bd_s.at[2][...] = (row_vec(b_ref) * dl).astype(_BF16)
        plgpu.barrier_wait(bar)
        for cb in range(nb):  # the bounded rows, on the tensor cores
            cs = pl.ds(cb * w, w)
            g, qx, kx = first if cb == 0 else tiles(cb)
            up, down = rw.anchored(g, blocks.first_rows(g_ref.at[idx], cs, nc), SIGMA)
            if cb:
                plgpu.commit_smem()  # every thread is done with the previous block's operands
            yk_s[...] = (kx * down).astype(_BF16)
            xk_s[...] = (kx * up).astype(_BF16)
            xq_s[...] = (qx * up).astype(_BF16)
            plgpu.commit_smem()
            got = (up * _mm((C, w), (bd_s.at[0], yk_s)), up * _mm((C, w), (bd_s.at[1], yk_s)),
                   down * _mm((C, w), (bd_s.at[2].T, xk_s), (bd_s.at[1].T, xq_s)))
            for ref, x in zip(outs, got):
                ref.at[idx].at[:, cs][...] = x

        @pl.when(ok_ref[n, b, h] == 0)  # some row is unbounded: add the exact band sums
        def _():
            t = intra._Tiles(dict(q=q_ref, k=k_ref, G=g_ref), dict(q=q_s, k=k_s, a=g_s), idx, C)
            for cb in range(nb):
                t.stage(cb)
                cs = pl.ds(cb * w, w)
                for ref, x in zip(outs, intra.adjoint_sums(t, r_s, c_s)):
                    ref.at[idx].at[:, cs][...] = plgpu.load(ref.at[idx].at[:, cs], layout=_WG, optimized=False) + x

    out = tuple(jax.ShapeDtypeStruct((N, B, H, C, K), _F32) for _ in range(3))
    # the block-diagonal matrices take the swizzle of the 32-channel operand tiles (wgmma needs one)
    scratch = intra.adjoint_scratch(C, q.dtype) + [_tiled((3, C, C), minor=w)] + [_tiled((C, w)) for _ in range(3)]
    kern = intra._kernel(body, name="kda_diagonal_adjoint", interpret=interpret, grid=(N, B, H),
                         grid_names=("n", "b", "h"), out_type=out,
                         scratch_types=scratch + [plgpu.Barrier(num_arrivals=2)])
    return kern(q, k, G, rows, cols, dL, dP, beta, safe_rows, bounded)
