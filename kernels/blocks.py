"""Both gated products of a chunk, whole, in one Pallas Mosaic GPU kernel (H100).

Per chunk and value head (kda_spec §3.2, ``kda_jax.ops.chunked``), with G the in-chunk cumsum
of the log decay and zones the documents inside the chunk:

    Aqk = s · tril(P) ⊙ same_zone            P_ij = Σ_d q_id k_jd e^{G_id − G_jd}
    L   = β_i · strict_tril(R) ⊙ same_zone   R_ij = Σ_d k_id k_jd e^{G_id − G_jd}

``gated_blocks`` forms both, float32 ``[C, C]``, in one CTA per (chunk, batch row, head),
replacing the XLA code around ``intra.band_lower`` (the reference-point factors, the
off-diagonal einsums, the bands-to-blocks gathers and the masks, each a pass over HBM):

* the exact diagonal 16×16 sub-blocks: ``intra.band_sums`` (bands in shared memory), moved into
  the register tile with one select per distance δ. Its decays are running products of factors
  ≤ 1, so its band values are exact for every causal pair at distance δ < 16, also across a
  sub-chunk boundary:
  all of them replace the tensor-core entries at those distances (float32 sums there);
* the off-diagonal sub-blocks on the tensor cores, with no 16-row products (benchmarks/NOTES.md,
  "Next" 1b): for each query sub-chunk p ≥ 1, ``X_p = X ⊙ e^{G − G_n(p)}`` with the rows outside p
  zeroed and ``Y_p = k ⊙ e^{G_n(p) − G}`` with the rows from n(p) = 16p on zeroed, so that
  ``Σ_p X_p·Y_pᵀ`` is exactly the strictly block-lower part. Two exponentials per element serve
  every p: ``e^{G − G_n(s)}`` around the first row of each row's own sub-chunk s (the factor of
  X_p, whose rows are those of s = p), and ``e^{G_n(s+1) − G}`` around the first row of the next
  one, times the column factor ``e^{G_n(p) − G_n(s+1)}`` for the key rows of s < p. Every exponent
  is ≤ 0 (clamped), so gates of −1000 stay finite. The operands are rounded to bf16 (float32
  accumulation), the precision of W, U, Kd and the state pass's operands.

Bounded rows (``factored``, default ``FACTORED_DIAGONAL``): with the diagonal sub-block p included
in the product of p — ``X_p = X ⊙ e^{G − G_n(p) + σ}`` on p's rows, ``Y_p = k ⊙ e^{G_n(p) − G − σ}``
on the rows up to p's last, σ = ``SIGMA`` — the tensor cores give every causal entry, and for a row i
whose decay since n(p) stays within ``SAFE_SPAN`` in every channel both factors are within
e^{±80}: its entries are used as they are (bf16 operands, like the off-diagonal blocks). Only the
other rows (Kimi Linear's unbounded gate: −1000 entries) take the exact bands, and a chunk whose
rows are all bounded skips the bands altogether. The anchor is each sub-chunk's first row and σ a
constant, and a row's bound depends on its own sub-chunk's rows up to itself, so no entry depends
on a later token (kda_spec §3.5 ii: the causal anchor), bit for bit. The key exponent is clamped at
80: a row it would overflow is one of the unbounded rows, which read bands there.

With ``inverse`` the kernel returns T = (I + L)⁻¹ (kda_spec §3.4) in place of L, formed in its
epilogue from L in registers: starting from the inverses of the 2×2 diagonal blocks, I − L there,
neighbouring diagonal blocks of size s merge into blocks of 2s, ``[[A, 0], [L₂₁, B]]⁻¹ =
[[A⁻¹, 0], [−B⁻¹L₂₁A⁻¹, B⁻¹]]``, for every pair at once as ``T ← T − T·L_s·T`` with L_s the L₂₁
blocks of L (s = 2, 4, …, C/2): the terms of block forward substitution (``chunked._unit_lower_inverse``),
no powers of L, so no growth beyond T's own entries. Each product runs on the tensor cores with
operands split into bf16 high and low parts (hi·hi + hi·lo + lo·hi, float32 accumulation: ~2⁻¹⁶
relative per product), which the XLA inverse did as HIGHEST-precision GEMMs and ~0.2 ms of small
fusions at the mid shape (NOTES v13).

G ≤ 0 increments are assumed (a log decay), as in ``intra``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kda_jax.kernels import intra
from kda_jax.kernels.state_pass import _BF16, _F32, _ROW, _WG, _mm, _tiled, check_operand

SUB = intra.SUB
_COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column of a WGMMA-layout tile
BLOCK_D = 64  # channels per wgmma operand tile where a kernel names no other (bf16 rows of 128 bytes)
# Channels per operand tile of ``gated_blocks``' tensor-core products, and the widths it accepts. With
# the exact bands on every row, 64 (255 registers, 12 bytes spilled) and 32 (181) took the same time
# (benchmarks/NOTES.md v7); with the factored diagonal, 64 spills ~600 bytes and takes 0.45–0.49 ms
# against 0.37–0.38 at 32 (v10, H200, mid shape).
OFF_BLOCK_D = 32
OFF_BLOCK_CHOICES = (32, 64)
# Sets of operand tiles in shared memory: with 2, the next sub-chunk's tiles are formed while the
# tensor cores read the previous ones (0.374 against 0.383 ms at 32 channels, v10).
OPERAND_BUFFERS = 2
# The diagonal sub-blocks of rows whose gates are bounded, on the tensor cores (module docstring,
# "Bounded rows"): read while tracing when a call names no ``factored``.
FACTORED_DIAGONAL = True
# Rows whose decay since their sub-chunk's first row stays within SAFE_SPAN in every channel take the
# tensor-core values; the anchor shift SIGMA keeps both factors inside e^{±(SAFE_SPAN − SIGMA)} and
# e^{±SIGMA} (f32 and bf16 reach e^{88}).
SIGMA = 40.0
SAFE_SPAN = 120.0


_check = functools.partial(check_operand, "gated_blocks")


class _Rows:
    """Per-row helpers on ``[C, width]`` WGMMA-layout tiles of one chunk: ``sub`` is each row's
    sub-chunk, ``by_sub`` spreads per-sub-chunk column vectors over the rows."""

    def __init__(self, C, width):
        self.shape = (C, width)
        self.sub = plgpu.broadcasted_iota(jnp.int32, self.shape, 0, layout=_WG) // SUB

    def tile(self, col):
        return lax.broadcast_in_dim(col, self.shape, [1])

    def by_sub(self, cols, rest):
        """Column vector ``cols[s]`` on the rows of sub-chunk s, ``rest`` on the later rows."""
        m = rest
        for s, c in enumerate(cols):
            m = jnp.where(self.sub == s, self.tile(c), m)
        return m

    def anchored(self, g, gn, sigma):
        """``(e^{G − G_n(s) + σ}, e^{min(G_n(s) − G − σ, 80)})`` with s each row's own sub-chunk, from
        the G tile ``g`` and its rows n(s) = 16s as column vectors ``gn`` (module docstring)."""
        gown = self.by_sub(gn[:-1], self.tile(gn[-1]))
        return jnp.exp(jnp.minimum(g - gown, 0.0) + sigma), jnp.exp(jnp.minimum(gown - g - sigma, 80.0))


def first_rows(g_ref, cols, nc):
    """G at the first row of each sub-chunk, column vectors over ``cols`` (``g_ref``: one chunk)."""
    return [plgpu.load(g_ref.at[p * SUB, cols], layout=_COL, optimized=False) for p in range(nc)]


def bounded_rows(G):
    """``([N, B, H, C], [N, B, H])`` float32 and int32: 1 where a row's decay since the first row of
    its sub-chunk is at most ``SAFE_SPAN`` in every channel, and where every row of the chunk is so."""
    *lead, C, K = G.shape
    Gb = G.reshape(*lead, C // SUB, SUB, K)
    ok = jnp.max(Gb[..., :1, :] - Gb, axis=-1).reshape(*lead, C) <= SAFE_SPAN
    return ok.astype(_F32), jnp.all(ok, axis=-1).astype(jnp.int32)


def same_document(z_ref, C):
    """``[C, C]`` WGMMA-layout mask: rows i and j of the chunk lie in one document (``z_ref``: the chunk's
    ``[C]`` document counts)."""
    zr = lax.broadcast_in_dim(plgpu.load(z_ref, layout=_ROW, optimized=False), (C, C), [0])
    zc = lax.broadcast_in_dim(plgpu.load(z_ref, layout=_COL, optimized=False), (C, C), [1])
    return zr == zc


def _split_product(a, b, smem, C):
    """a·b ``[C, C]`` float32 on the tensor cores with both operands split into bf16 high and low
    parts (hi·hi + hi·lo + lo·hi); ``smem`` ``[4, C, C]`` bf16 holds the parts."""
    for slot, x in enumerate((a, b)):
        hi = x.astype(_BF16)
        smem.at[2 * slot][...] = hi
        smem.at[2 * slot + 1][...] = (x - hi.astype(_F32)).astype(_BF16)
    plgpu.commit_smem()
    out = _mm((C, C), (smem.at[0], smem.at[2]), (smem.at[0], smem.at[3]), (smem.at[1], smem.at[2]))
    plgpu.commit_smem()  # the operands are read before the next product overwrites them
    return out


def unit_lower_inverse(L, rows, cols, smem):
    """T = (I + L)⁻¹ of a strictly lower-triangular float32 ``[C, C]`` WGMMA-layout tile, by pairwise
    merges of diagonal blocks (module docstring); ``rows``, ``cols`` the tile's index iotas."""
    C = L.shape[0]
    pairs = lambda s: (rows // (2 * s) == cols // (2 * s)) & (rows // s == cols // s + 1)  # the L₂₁ blocks
    T = jnp.where(rows == cols, 1.0, 0.0) - jnp.where(pairs(1), L, 0.0)  # the 2×2 diagonal blocks
    s = 2
    while s < C:
        T = T - _split_product(_split_product(T, jnp.where(pairs(s), L, 0.0), smem, C), T, smem, C)
        s *= 2
    return T


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "buffers", "block_d", "factored", "inverse"))
def gated_blocks(q, k, G, beta, zone, *, scale, interpret=False, buffers=None, block_d=None, factored=None,
                 inverse=None):
    """``(Aqk, L)``, each ``[N, B, H, C, C]`` float32 (module docstring), from ``q, k`` (bf16 or
    float32, one dtype) chunk-major ``[N, B, H, C, K]`` or time-major ``[B, N·C, H, K]`` (both the
    same layout), float32 chunk-major ``G [N, B, H, C, K]``,
    ``beta [N, B, H, C]`` and the zone of each row ``zone [N, B, C]`` (float32 document counts
    inside the chunk; zeros when there are no documents); ``buffers``: sets of operand tiles
    (default ``OPERAND_BUFFERS``); ``block_d``: channels per off-diagonal operand tile (default
    ``OFF_BLOCK_D``); ``factored``: bounded rows' diagonal sub-blocks on the tensor cores (default
    ``FACTORED_DIAGONAL``; off, every row takes the exact bands); ``inverse``: a dtype (bf16 or float32)
    to return T = (I + L)⁻¹ in, in place of L (module docstring)."""
    N, B, H, C, K = intra._operands(q, k, G)
    buffers = OPERAND_BUFFERS if buffers is None else buffers
    if buffers not in (1, 2):
        raise ValueError(f"gated_blocks: buffers must be 1 or 2, got {buffers}")
    bd = OFF_BLOCK_D if block_d is None else block_d
    if bd not in OFF_BLOCK_CHOICES:
        raise ValueError(f"gated_blocks: block_d must be one of {OFF_BLOCK_CHOICES}, got {block_d}")
    _check("beta", beta, (N, B, H, C), _F32)
    _check("zone", zone, (N, B, C), _F32)
    if K % 64:
        raise ValueError(f"gated_blocks needs K a multiple of 64; got K={K}")
    nc = C // SUB
    if inverse is not None:
        inverse = jnp.dtype(inverse)
        if inverse not in (jnp.dtype(_BF16), jnp.dtype(_F32)):
            raise ValueError(f"gated_blocks: inverse must be bfloat16 or float32, got {inverse}")
    factored = FACTORED_DIAGONAL if factored is None else bool(factored)
    if factored:
        safe_rows, safe_chunk = bounded_rows(G)
    else:
        safe_rows, safe_chunk = jnp.zeros((N, B, H, C), _F32), jnp.zeros((N, B, H), jnp.int32)
    sigma = SIGMA if factored else 0.0
    first_p = 0 if factored else 1  # with the diagonal sub-block in its product, p = 0 has one too

    def body(q_ref, k_ref, g_ref, b_ref, z_ref, sr_ref, sc_ref, a_ref, l_ref, k_s, g_s, o_s, xq_s, xk_s, y_s,
             *inv_s):
        n, b, h = lax.axis_index("n"), lax.axis_index("b"), lax.axis_index("h")
        idx = (n, b, h)

        @pl.when(sc_ref[n, b, h] == 0)  # some row is unbounded: the exact bands
        def _():
            intra.band_sums(intra._Tiles(dict(q=q_ref, k=k_ref, G=g_ref), dict(k=k_s, a=g_s), idx, C),
                            K // intra.BLOCK_K, o_s)

        def off_diagonal(acc_p, acc_r):
            rw = _Rows(C, bd)
            sub = rw.sub
            it = 0
            for cb in range(K // bd):
                cs = pl.ds(cb * bd, bd)
                load = lambda ref: plgpu.load(intra.chunk(ref, idx, C).at[:, cs], layout=_WG,
                                              optimized=False).astype(_F32)
                g, qx, kx = load(g_ref), load(q_ref), load(k_ref)
                gn = first_rows(g_ref.at[idx], cs, nc)
                own, kd = rw.anchored(g, gn, sigma)  # e^{G − G_n(s) + σ}, and its key-side partner
                # e^{G_n(s+1) − G − σ}, s < nc − 1
                nxt = jnp.exp(jnp.minimum(rw.by_sub(gn[1:], rw.tile(gn[-1])) - g, 0.0) - sigma)
                qo, ko, kn = qx * own, kx * own, kx * nxt
                if factored:
                    kd = kx * kd  # the key rows of the diagonal sub-block
                for p in range(first_p, nc):
                    rows_p = sub == p
                    # e^{G_n(p) − G_n(s+1)} on the key rows of sub-chunk s < p − 1, 1 on those of p − 1
                    fac = rw.by_sub([jnp.exp(jnp.minimum(gn[p] - gn[s_ + 1], 0.0)) for s_ in range(p - 1)], 1.0)
                    slot = it % buffers
                    if it >= buffers:  # the products that read this slot's tiles are done
                        plgpu.wgmma_wait(2 * (buffers - 1))
                    it += 1
                    xq, xk, y = xq_s.at[slot], xk_s.at[slot], y_s.at[slot]
                    xq[...] = jnp.where(rows_p, qo, 0.0).astype(_BF16)
                    xk[...] = jnp.where(rows_p, ko, 0.0).astype(_BF16)
                    before = jnp.where(sub < p, kn * fac, 0.0)
                    y[...] = (jnp.where(rows_p, kd, before) if factored else before).astype(_BF16)
                    plgpu.commit_smem()
                    plgpu.wgmma(acc_p, xq, y.T)
                    plgpu.wgmma(acc_r, xk, y.T)
            return acc_p[...], acc_r[...]

        P, R = pl.run_scoped(off_diagonal, plgpu.ACC((C, C), _F32), plgpu.ACC((C, C), _F32))
        plgpu.commit_smem()  # the bands, written row by row, visible to every thread

        rows = plgpu.broadcasted_iota(jnp.int32, (C, C), 0, layout=_WG)
        dist = rows - plgpu.broadcasted_iota(jnp.int32, (C, C), 1, layout=_WG)
        row_vec = lambda ref: lax.broadcast_in_dim(plgpu.load(ref, layout=_ROW, optimized=False), (C, C), [0])

        exact = row_vec(sr_ref.at[idx]) == 0.0  # unbounded rows (all rows unless factored)

        def diagonal(d, pr):  # band[δ, i] = M[i, i − δ]: exact for every causal pair at distance δ
            return tuple(jnp.where((dist == d) & exact, row_vec(o_s.at[s, d]), m) for s, m in enumerate(pr))

        P, R = lax.fori_loop(0, SUB, diagonal, (P, R))
        same = same_document(z_ref.at[n, b], C)
        a_ref.at[idx][...] = jnp.where((dist >= 0) & same, scale * P, 0.0)
        L = jnp.where((dist > 0) & same, row_vec(b_ref.at[idx]) * R, 0.0)
        if inverse is not None:
            cols = plgpu.broadcasted_iota(jnp.int32, (C, C), 1, layout=_WG)
            L = unit_lower_inverse(L, rows, cols, inv_s[0]).astype(inverse)
        l_ref.at[idx][...] = L

    out = (jax.ShapeDtypeStruct((N, B, H, C, C), _F32), jax.ShapeDtypeStruct((N, B, H, C, C), inverse or _F32))
    scratch = intra.band_scratch(C, k.dtype) + [_tiled((buffers, C, bd)) for _ in range(3)]
    if inverse is not None:
        scratch.append(_tiled((4, C, C)))  # the bf16 parts of the inverse's operands
    kern = intra._kernel(body, name="kda_gated_blocks", interpret=interpret, grid=(N, B, H),
                         grid_names=("n", "b", "h"), out_type=out, scratch_types=scratch)
    return kern(q, k, G, beta, zone, safe_rows, safe_chunk)
