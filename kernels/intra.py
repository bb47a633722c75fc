"""The exact diagonal sub-blocks of chunked KDA's gated products, as Pallas Mosaic GPU kernels.

Inside a 16-row sub-chunk the decay e^{G_i − G_j} (j ≤ i) cannot be split around a reference
row without overflow under Kimi Linear's unbounded gate (kda_spec §3.5 ii), so those entries are
summed exactly, channel by channel: ~8.5·K exponentials per token. XLA runs this as a reduction
over a ``[…, 16, 16, K]`` product (2.1 ms of the 4.5 ms forward at the mid shape, and most of the
backward, benchmarks/NOTES.md); here each CTA does one chunk, one 32-column block of channels at
a time, with the operands in registers and in shared memory.

The products are indexed by the distance δ = i − j ∈ [0, 16) ("bands"): for each δ the tile of
rows i meets the same tile shifted down by δ rows, so every step is elementwise on two ``[C, 32]``
tiles in the WGMMA register layout, plus a reduction over the columns. Rows whose partner lies
in the previous sub-chunk (i mod 16 < δ) are computed too and discarded by the caller
(``kernels/kda.py``, which turns bands into blocks); every exponent is clamped at 0, so
those rows stay finite, and the rows beyond the chunk that a shifted tile reads are filled with
the chunk's own rows.

``band_lower``: for operands X ∈ {q, k} and Y = k,
    band[s, δ, i] = Σ_d X_s[i, d] · k[i − δ, d] · e^{G[i, d] − G[i − δ, d]}
``band_adjoint``: the two adjoints of those sums, for row bands r_s[δ, i] = dM_s[i, i − δ] and
column bands c_s[δ, j] = dM_s[j + δ, j] (β folded into the L band by the caller):
    row_s[i, d] = Σ_δ r_s[δ, i] · k[i − δ, d] · e^{G[i, d] − G[i − δ, d]}
    col[j, d]   = Σ_δ (c_L[δ, j] · k[j + δ, d] + c_P[δ, j] · q[j + δ, d]) · e^{G[j + δ, d] − G[j, d]}
float32 arithmetic throughout (q, k may be bf16 or float32; G and the bands are float32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kda_jax.kernels.state_pass import _F32, _ROW, _WG, check_operand, chunk
from kda_jax.kernels.state_pass import _kernel as _plain_kernel

SUB = 16
BLOCK_K = 32  # channels per register tile: 16 float32 registers per thread for a [64, 32] tile
# Shared-memory rows are padded so that a warp's load of 8 rows × 32 bytes spreads over the banks.
_PAD = {2: 8, 4: 8}
# ex2.approx for the decays (every exponent is ≤ 0; relative error ~1e-7, far inside bf16 rounding).
APPROX_EXP = True
# Distances per iteration of the adjoint's loops (fully unrolled, the kernel needed 253 registers).
ADJOINT_UNROLL = 1


def _kernel(body, **kw):
    return _plain_kernel(body, approx_math=APPROX_EXP, **kw)


_check = functools.partial(check_operand, "intra kernel")


def _operands(q, k, G):
    """``(N, B, H, C, K)`` of chunk-major float32 ``G [N, B, H, C, K]`` and q, k in one layout (``chunk``)."""
    if G.ndim != 5:
        raise ValueError(f"intra kernel: G must be chunk-major [N, B, H, C, K], got shape {tuple(G.shape)}")
    N, B, H, C, K = G.shape
    qk = (N, B, H, C, K) if k.ndim == 5 else (B, N * C, H, K)
    for name, x, shape, dts in (("q", q, qk, (k.dtype,)), ("k", k, qk, (jnp.bfloat16, jnp.float32)),
                                ("G", G, (N, B, H, C, K), (_F32,))):
        _check(name, x, shape, dts)
    if C % 64 or K % BLOCK_K:
        raise ValueError(f"intra kernel needs C a multiple of 64 and K of {BLOCK_K}; got C={C} K={K}")
    return N, B, H, C, K


def _padded(rows, dtype):
    return plgpu.SMEM((rows, BLOCK_K + _PAD[jnp.dtype(dtype).itemsize]), dtype)


class _Tiles:
    """One chunk's operands, one block of BLOCK_K channels at a time: ``[C, BLOCK_K]`` register
    tiles straight from global memory, and row-shifted copies read back from padded shared memory
    (rows [SUB, SUB + C) hold the chunk; the SUB rows on either side hold rows of the same chunk,
    as finite filler). One shared buffer per operand serves all the column blocks. The buffer
    named ``a`` holds the per-row decay a_i = e^{min(G_i − G_{i−1}, 0)} in place of G, so that a
    band's decay e^{G_i − G_{i∓δ}} is a running product over δ (``decay``), not an exponential."""

    def __init__(self, refs, smem, idx, C):
        self.refs, self.smem, self.idx, self.C = refs, smem, idx, C

    def _at(self, name, r0):
        return self.smem[name].at[pl.ds(r0, self.C), pl.ds(0, BLOCK_K)]

    def _fill(self, tiles):
        """Each register tile into its padded buffer: the filler rows first, then the chunk's rows."""
        for r0 in (0, 2 * SUB):  # filler (rows 0..SUB and C+SUB..C+2·SUB end up as chunk rows)
            for name, x in tiles.items():
                self._at(name, r0)[...] = x
        plgpu.commit_smem()  # the chunk's own rows overwrite the filler only after it landed
        for name, x in tiles.items():
            self._at(name, SUB)[...] = x
        plgpu.commit_smem()

    def stage(self, cb):
        """Column block ``cb`` of every operand but G: its register tiles (float32) by name, with the
        shared-memory copies (and ``a``) written and visible to the whole warpgroup."""
        cols = pl.ds(cb * BLOCK_K, BLOCK_K)
        if cb:
            plgpu.commit_smem()  # every thread is done with the previous block's rows
        tiles = {name: plgpu.load(chunk(ref, self.idx, self.C).at[:, cols], layout=_WG, optimized=False)
                 for name, ref in self.refs.items()}
        self._fill({name: tiles["G" if name == "a" else name] for name in self.smem})
        a = _decay(tiles["G"], self.shifted("a", 1, -1))  # G_{i−1} from the buffer that a then replaces
        plgpu.commit_smem()  # every thread has read its G rows
        self._fill({"a": a})
        return {name: x.astype(_F32) for name, x in tiles.items() if name != "G"}

    def shifted(self, name, delta, sign=1):
        """Rows i + sign·delta of the chunk (0 ≤ delta < SUB, static or traced) in the staged block, as float32."""
        start = SUB + delta if sign > 0 else SUB - delta
        return plgpu.load(self.smem[name].at[pl.ds(start, self.C), pl.ds(0, BLOCK_K)], layout=_WG,
                          optimized=False).astype(_F32)

    def decay(self, D, delta, sign):
        """The running product one step on: with ``D = e^{G_i − G_{i−δ+1}}`` (``sign`` −1; rows i, 1 ≤ δ
        < SUB) it returns e^{G_i − G_{i−δ}} = D·a_{i−δ+1}; with ``D = e^{G_{j+δ−1} − G_j}`` (``sign`` +1)
        it returns e^{G_{j+δ} − G_j} = D·a_{j+δ}. Every factor is ≤ 1: no overflow for any gate, and
        exact up to one rounding per step for causal pairs (the clamp only touches discarded ones)."""
        return D * self.shifted("a", delta - 1 if sign < 0 else delta, sign)


def _decay(hi, lo):
    """e^{min(hi − lo, 0)}: exact for causal pairs (hi − lo ≤ 0), finite for discarded ones."""
    return jnp.exp(jnp.minimum(hi - lo, 0.0))


def _ones(C):
    return plgpu.layout_cast(jnp.ones((C, BLOCK_K), _F32), _WG)


def _row(vec, C):
    return lax.broadcast_in_dim(vec, (C, BLOCK_K), [0])


@functools.partial(jax.jit, static_argnames=("interpret",))
def band_lower(q, k, G, *, interpret=False):
    """``[N, B, H, 2, SUB, C]`` float32 bands of the q·k and k·k gated products (module docstring)
    from ``q, k`` (bf16 or float32, one dtype) chunk-major ``[N, B, H, C, K]`` or time-major
    ``[B, N·C, H, K]`` (``chunk``) and float32 chunk-major G."""
    N, B, H, C, K = _operands(q, k, G)

    def body(q_ref, k_ref, g_ref, out_ref, k_s, g_s, o_s):
        idx = (lax.axis_index("n"), lax.axis_index("b"), lax.axis_index("h"))
        band_sums(_Tiles(dict(q=q_ref, k=k_ref, G=g_ref), dict(k=k_s, a=g_s), idx, C), K // BLOCK_K, o_s)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_s, out_ref.at[idx])
        plgpu.wait_smem_to_gmem(0)

    kern = _kernel(body, name="kda_intra_band_lower", interpret=interpret, grid=(N, B, H), grid_names=("n", "b", "h"),
                   out_type=jax.ShapeDtypeStruct((N, B, H, 2, SUB, C), _F32), scratch_types=band_scratch(C, k.dtype))
    return kern(q, k, G)


def band_scratch(C, dtype):
    """Shared memory of ``band_sums``: the staged k and a blocks, and the bands ``[2, SUB, C]``."""
    rows = C + 2 * SUB
    return [_padded(rows, dtype), _padded(rows, _F32), plgpu.SMEM((2, SUB, C), _F32)]


def band_sums(t, nb, o_s):
    """The q·k and k·k bands of one chunk into ``o_s [2, SUB, C]`` (float32, shared memory; each
    thread holds the rows it wrote — commit before another thread reads them)."""
    for cb in range(nb):
        x = t.stage(cb)

        # a loop over δ, not 16 unrolled copies: unrolled, the kernel stalled on instruction
        # fetch (Nsight Compute, benchmarks/NOTES.md v4)
        def step(d, D):  # D = e^{G_i − G_{i−δ}}
            y = t.shifted("k", d, -1) * D
            for s, xs in enumerate((x["q"], x["k"])):
                part = jnp.sum(xs * y, axis=1)  # the partial sums live in shared memory, not registers;
                acc = o_s.at[s, d]  # each thread reads back only the rows it wrote
                acc[...] = part if cb == 0 else plgpu.load(acc, layout=_ROW, optimized=False) + part
            return t.decay(D, d + 1, -1)

        lax.fori_loop(0, SUB, step, _ones(t.C))


@functools.partial(jax.jit, static_argnames=("interpret",))
def band_adjoint(q, k, G, rows, cols, *, interpret=False):
    """``(row_L, row_P, col)``, each ``[N, B, H, C, K]`` float32 (module docstring), from the
    operands of ``band_lower`` and float32 bands ``rows = (r_L, r_P)``, ``cols = (c_L, c_P)`` stacked
    as ``[N, B, H, 2, SUB, C]``."""
    N, B, H, C, K = _operands(q, k, G)
    for name, x in (("rows", rows), ("cols", cols)):
        _check(name, x, (N, B, H, 2, SUB, C), (_F32,))
    nb = K // BLOCK_K

    def body(q_ref, k_ref, g_ref, r_ref, c_ref, rl_ref, rp_ref, col_ref, q_s, k_s, g_s, r_s, c_s, bar):
        idx = (lax.axis_index("n"), lax.axis_index("b"), lax.axis_index("h"))
        plgpu.copy_gmem_to_smem(r_ref.at[idx], r_s, bar)
        plgpu.copy_gmem_to_smem(c_ref.at[idx], c_s, bar)
        t = _Tiles(dict(q=q_ref, k=k_ref, G=g_ref), dict(q=q_s, k=k_s, a=g_s), idx, C)
        plgpu.barrier_wait(bar)
        for cb in range(nb):
            t.stage(cb)
            cols_ = pl.ds(cb * BLOCK_K, BLOCK_K)
            row_l, row_p, col = adjoint_sums(t, r_s, c_s)
            rl_ref.at[idx].at[:, cols_][...] = row_l
            rp_ref.at[idx].at[:, cols_][...] = row_p
            col_ref.at[idx].at[:, cols_][...] = col

    out = tuple(jax.ShapeDtypeStruct((N, B, H, C, K), _F32) for _ in range(3))
    kern = _kernel(body, name="kda_intra_band_adjoint", interpret=interpret, grid=(N, B, H),
                   grid_names=("n", "b", "h"), out_type=out,
                   scratch_types=adjoint_scratch(C, q.dtype) + [plgpu.Barrier(num_arrivals=2)])
    return kern(q, k, G, rows, cols)


def adjoint_scratch(C, dtype):
    """Shared memory of ``adjoint_sums``: the staged q, k and a blocks, the row and column bands."""
    rows = C + 2 * SUB
    return [_padded(rows, dtype), _padded(rows, dtype), _padded(rows, _F32), plgpu.SMEM((2, SUB, C), _F32),
            plgpu.SMEM((2, SUB, C), _F32)]


def adjoint_sums(t, r_s, c_s):
    """``(row_L, row_P, col)`` ``[C, BLOCK_K]`` float32 of the staged column block of ``t`` (``_Tiles``
    over q, k and a) from the row and column bands in shared memory (``band_adjoint``)."""
    C = t.C
    band = lambda ref, s, d: _row(plgpu.load(ref.at[s, d], layout=_ROW, optimized=False), C)

    def rows_step(d, carry):  # D = e^{G_i − G_{i−δ}}
        D = t.decay(carry[-1], d, -1)
        y = t.shifted("k", d, -1) * D
        return tuple(a + band(r_s, s, d) * y for s, a in enumerate(carry[:-1])) + (D,)

    def col_step(d, carry):  # D = e^{G_{j+δ} − G_j}
        acc, D = carry
        D = t.decay(D, d, 1)
        x = band(c_s, 0, d) * t.shifted("k", d) + band(c_s, 1, d) * t.shifted("q", d)
        return acc + x * D, D

    # the row adjoints first, then the column sum (fewer live tiles); δ = 0 (decay 1) starts each
    # sum, a loop over the other distances keeps the compiler from hoisting all their loads
    kc = t.shifted("k", 0)
    ones = _ones(C)
    row_l, row_p, _ = lax.fori_loop(1, SUB, rows_step, (band(r_s, 0, 0) * kc, band(r_s, 1, 0) * kc, ones),
                                    unroll=ADJOINT_UNROLL)
    col, _ = lax.fori_loop(1, SUB, col_step, (band(c_s, 0, 0) * kc + band(c_s, 1, 0) * t.shifted("q", 0), ones),
                           unroll=ADJOINT_UNROLL)
    return row_l, row_p, col
