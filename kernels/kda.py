"""Chunked KDA with its serial passes and its gated intra-chunk products on Mosaic GPU kernels.

``kda_mosaic`` is ``kda_jax.ops.chunked.kda_chunked`` with ``passes=MosaicPasses()``: the same
chunked algorithm and one backward, with pieces of it moved onto kernels. Kernels run the two
recurrences over the chunks (forward states and the reverse sweep of dS, ``state_pass``), Aqk and
L whole in the forward (``blocks``: the off-diagonal sub-blocks, and the diagonal ones of rows
with bounded gates, on the tensor cores with a causal anchor; the exact diagonal bands for the
other rows; masks included) and the diagonal sub-blocks' adjoints in the backward
(``intra``, or ``adjoint`` with the bounded rows on the tensor cores: ``FACTORED_ADJOINT``; "bands"
``band[δ, i] = M[i, i − δ]``, converted from and to blocks here by static gathers); ``wy`` can
form the forward's W, U, Kd, Qs (``FACTORS_KERNEL``, off) and the backward through them and the
inverse (``WY_ADJOINT_KERNEL``, off); ``inter`` the backward's parts through the chunk states
(``INTER_ADJOINT_KERNEL``, off); ``cumsum`` the gate's in-chunk cumsum G
and its adjoint, each in one pass between the caller's layout and the chunk-major one
(``CUMSUM_KERNEL``). The kernels read q and k, and ``output_pass`` writes o, in the caller's
``[B, T, H, K]`` layout (``TIME_MAJOR``). The triangular inverse (unless ``INVERSE_IN_BLOCKS``), the
gating factors of the backward and the gradients that follow from the chunk states stay XLA. Operands the
state passes, the tensor-core products and XLA's GEMMs (``BF16_OPERANDS``) read are rounded to bf16
(the state and all accumulations stay float32), so float32 inputs give bf16-level agreement, within
the thresholds of kda_spec §5.3; the diagonal bands are float32 sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kda_jax.kernels import adjoint, blocks, cumsum, inter, intra, state_pass, wy
from kda_jax.ops.chunked import ScanPasses, _diag_blocks, _from_chunks, _to_chunks, kda_chunked
from kda_jax.ops.inputs import GATE_FLOOR, apply_gate_floor

_BF16, _F32 = jnp.bfloat16, jnp.float32
# ``output_pass`` (the forward state pass that also forms o, h and Vn never reach HBM) for calls that
# are not differentiated. ``test_gpu_fused_output_*`` (bf16 and float32, packed documents with
# boundaries inside chunks, h0, GVA, −1000 gates, the undifferentiated call against float64) passed
# on an H100 at commit 16f8c03; mid forward 2.94 → 2.79 ms (benchmarks/NOTES.md v4).
FUSED_OUTPUT = True
# The head sizes (K, V) at which the compiled fused kernel is GPU-tested: (128, 128) by those tests,
# (64, 64) and (64, 128) by ``test_gpu_matches_float64_recurrence`` (its undifferentiated call, against
# float64; H200, commit 6345bd7, benchmarks/NOTES.md v10). Other sizes keep ``forward_output``;
# interpret mode (CPU tests) runs the kernel at any size.
FUSED_OUTPUT_KV = ((128, 128), (64, 64), (64, 128))
# The exact diagonal sub-blocks of the gated products on the ``intra`` kernels instead of XLA. With it
# on, the kernel GPU tests (tests/kernels/test_mosaic.py and test_intra_kernel.py, ``-m gpu``: 17)
# passed on an H100 at commit e37d402, and forward+backward at the mid shape took 7.8 instead of
# 12.0 ms of kernels (benchmarks/NOTES.md).
INTRA_KERNEL = True
# Aqk and L whole (diagonal bands, off-diagonal sub-blocks on the tensor cores, masks) in one kernel
# (``blocks.gated_blocks``) instead of ``band_lower`` and the XLA around it. Its GPU tests
# (tests/kernels/test_blocks_kernel.py, 4, and test_mosaic.py ``-k blocks``, 6: bf16 and float32,
# K = 64/128, packed documents, GVA, −1000 gates) passed on an H200 at commit edb2ece; at the mid
# shape the op's kernels went 2.08 → 1.98 ms forward and 5.94 → 5.68 ms forward+backward (profiler,
# H200; benchmarks/NOTES.md v7).
BLOCKS_KERNEL = True
# W, U, Kd and Qs of the forward in one kernel (``wy.forward_factors``, bf16 out) instead of XLA's
# float32 passes. Its GPU tests (tests/kernels/test_wy_kernel.py, 4, and test_mosaic.py ``-k factors``,
# 6) passed on an H200 at e667e9f, but it was not faster: 0.32 ms of kernel for the 0.32 ms of XLA it
# replaces at the mid shape (benchmarks/NOTES.md v8), so it stays off; a building block of the fused
# forward (NOTES "Next").
FACTORS_KERNEL = False
# The backward's diagonal adjoints with the bounded rows on the tensor cores (``adjoint.diagonal_adjoint``,
# the counterpart of the forward's factored diagonal) instead of ``intra.band_adjoint`` on every row.
# Its GPU tests (tests/kernels/test_adjoint_kernel.py ``-m gpu``, 8, and test_mosaic.py ``-k adjoint``,
# 11: bf16 and float32, K = 64/128, mixed and all-bounded chunks, the op vs float64 at five shapes with
# −1000 gates and with bounded ones, packed documents in float32) passed on an H200 at commit d03fd7a;
# mid forward+backward 5.28 → 5.19 ms back to back (benchmarks/NOTES.md v11). Since cf13249 the kernel
# forms its block-diagonal operands from dL and dP itself (NOTES v13); test_adjoint_kernel.py ``-m gpu``
# (8) and the op tests of test_mosaic.py (18, with ``test_gpu_factored_adjoint_bounded_gates``) passed there;
# with its first loads reordered (b29ce08, NOTES v14: 0.378 → 0.314 ms at mid) test_adjoint_kernel.py
# ``-m gpu`` (8) and 8 of ``test_gpu_matches_float64_recurrence`` passed.
FACTORED_ADJOINT = True
# G, the gate's in-chunk cumsum, from the caller's layout in one pass (``cumsum.gate_cumsum``; its VJP
# the reverse sum back into that layout) instead of XLA's transpose, triangular GEMM and transpose.
# Its GPU tests (tests/kernels/test_cumsum_kernel.py ``-m gpu``, 2, and test_mosaic.py ``-k cumsum``, 6:
# the op vs float64 at five shapes with −1000 gates, packed documents in float32) passed on an H200
# at commits cd9f53c and 847b5de (benchmarks/NOTES.md v11); mid 1.63 → 1.50 ms forward, 5.22 → 4.99 ms forward+backward back to back.
CUMSUM_KERNEL = True
# The XLA GEMMs around the kernels read bf16 operands (float32 accumulation), as the kernels' own
# products do: W = T·Kb and U = T·βV of the forward (written as bf16, which the state pass reads
# anyway), o's Qs·h and Aqk·Vn under differentiation, and every GEMM of the backward's gradient
# assembly (``chunked._core_bwd``: dO·hᵀ, Vn·dSnᵀ, Tᵀ·dW, Tᵀ·dVn, dT, Tᵀ·dT·Tᵀ, dO·Vnᵀ, the
# off-diagonal sub-blocks' adjoints). Off: float32 operands at XLA's default precision. The
# errors against float64 grow by up to ~0.1 of kda_spec §5.3's thresholds (o 0.62 → 0.74, final state
# 0.35 → 0.45 of them at B1 T150 HV2 K64 bf16, interpret mode). Its GPU tests (test_mosaic.py
# ``-k bf16_operands``, 6: five op shapes with −1000 gates, packed documents in float32; and with it on,
# ``test_gpu_matches_float64_recurrence`` at five shapes in bf16 and float32, causality, the front door
# with packed documents) passed on an H200 at e275188 and 0c9d925; mid forward 1.49 → 1.39 ms,
# forward+backward 4.98 → 4.68 ms back to back, same run (benchmarks/NOTES.md v12).
BF16_OPERANDS = True
# An optimization barrier on the backward's chunk-major gradients (``MosaicPasses.gradients``): without
# it XLA forms dq, dk, dv, dG in one fusion (transposed to the caller's layout on the way out) and dβ
# in a sibling reduction fusion that re-reads the same ~1.7 GB of float32 chunk tensors (0.47 + 0.32
# ms at mid); with it one multi-output fusion reads them once (0.36 ms) and the three transposes
# follow apart (~0.12 ms): mid forward+backward 4.78 → 4.60 ms of kernels (profiles at e275188, NOTES
# v12); on with the GPU tests above at 0c9d925.
GRADIENT_BARRIER = True
# The front door's gate floor max(g, ``inputs.GATE_FLOOR``) inside the cumsum kernel's pass (and its
# derivative inside the adjoint's) instead of an XLA pass over g before it. The ``mosaic`` implementation
# takes g unfloored (``floors_gate``) and ``gate_cumsum`` floors it either way; off, in XLA. Mid forward
# 1.274 → 1.212 ms of kernels, forward+backward 4.376 → 4.255 (H200 profiles; back to back 1.290 → 1.233
# and 4.412 → 4.297 ms, benchmarks/NOTES.md v16). With it on, test_cumsum_kernel.py ``-m gpu`` (3), the
# front-door floor through the op, and the ``gate_floor`` chunk-kernel tests (5 shapes and packed f32)
# passed on an H200 at 1c0e269.
GATE_FLOOR_KERNEL = True
# T = (I + L)⁻¹ formed in ``gated_blocks``' epilogue (``blocks.unit_lower_inverse``: pairwise merges of
# diagonal blocks as tensor-core products on bf16 high/low operand parts) instead of
# ``chunked._unit_lower_inverse`` in XLA. Correct on an H200 (test_blocks_kernel.py ``test_gpu_inverse``,
# the ``inverse`` chunk-kernel tests; 1c0e269) but slower: the epilogue adds 0.266 ms to ``gated_blocks``
# (0.343 → 0.609) while the XLA fusions it replaces took ~0.23, mid forward 1.274 → 1.311 ms of kernels
# (benchmarks/NOTES.md v17). Off.
INVERSE_IN_BLOCKS = False
# The backward through W, U and the inverse (dW, dKb, dUb, dT, dL and the dv, dβ, dk, dG parts they give)
# in one kernel (``wy.wy_adjoint``) instead of seven XLA GEMMs and the float32 fusions between them.
# Interpret-tested (test_wy_kernel.py, test_mosaic.py); off until its GPU tests have run
# (benchmarks/NOTES.md v18).
WY_ADJOINT_KERNEL = False
# The backward's parts through the chunk states (dq = s·(dO·hᵀ)⊙Γ, dk = (Vn·dSnᵀ)⊙E, their dG, the state
# decay's part of dG's last rows, and dP = s·dO·Vnᵀ) in one kernel (``inter.inter_adjoint``) instead of
# three XLA GEMMs and the float32 fusions around them. Interpret-tested (test_inter_kernel.py,
# test_mosaic.py); off until its GPU tests have run (benchmarks/NOTES.md v19).
INTER_ADJOINT_KERNEL = False
# q and k reach ``gated_blocks``, ``diagonal_adjoint`` (and ``band_lower``/``band_adjoint``) in the
# caller's time-major layout, and ``output_pass`` writes o in it: the passes hand them ``_from_chunks``
# of the chunk-major tensors (and return ``_to_chunks`` of o), which XLA folds into the caller's own
# arrays, so the q/k transposes before the kernels and o's after ``output_pass`` are not materialized.
# Mid forward 1.383 → 1.264 ms of kernels, forward+backward 4.434 → 4.362 (H200 profiles, NOTES v15).
# With it on, test_blocks_kernel.py, test_adjoint_kernel.py ``-m gpu``, the state passes at each width
# (o time-major bit for bit) and the fused-output op tests passed on an H200 at 3234d7d (34), and the op
# tests of test_mosaic.py (``test_gpu_matches_float64_recurrence``, causality, the front door, the
# bounded-gate adjoint; 18) with test_cumsum_kernel.py (2) at 5c47e80 (the same kernels).
TIME_MAJOR = True

_SUB = intra.SUB
_R, _C = np.arange(_SUB)[:, None], np.arange(_SUB)[None, :]


def _take(x, idx, keep):
    """x[..., r, idx[r, c]] where ``keep[r, c]``, else 0 (a static gather along the last axis)."""
    got = jnp.take_along_axis(x, jnp.broadcast_to(jnp.asarray(idx), (*x.shape[:-2], _SUB, _SUB)), axis=-1)
    return jnp.where(keep, got, 0.0)


def _to_chunk_rows(x):
    """[S, N, B, H, nc, 16 rows, 16 δ] -> the kernels' band layout [N, B, H, S, 16 δ, C]."""
    S, N, B, H, nc = x.shape[:5]
    return jnp.moveaxis(x, 0, 3).swapaxes(-1, -2).swapaxes(-2, -3).reshape(N, B, H, S, _SUB, nc * _SUB)


def bands_to_blocks(band):
    """Kernel bands ``[N, B, H, S, 16, C]`` (band[δ, i] = M[i, i − δ]) -> diagonal blocks ``[S, N, B, H, nc, 16, 16]``."""
    N, B, H, S, _, C = band.shape
    x = jnp.moveaxis(band.reshape(N, B, H, S, _SUB, C // _SUB, _SUB), 3, 0)  # [S, N, B, H, δ, nc, r]
    return _take(jnp.moveaxis(x, 4, -1), (_R - _C) % _SUB, _C <= _R)


def blocks_to_row_bands(M):
    """Diagonal blocks ``[S, ..., nc, 16, 16]`` -> bands r[δ, i] = M[i, i − δ] in the kernels' layout."""
    return _to_chunk_rows(_take(M, (_R - _C) % _SUB, _C <= _R))  # [.., r, δ]


def blocks_to_col_bands(M):
    """Diagonal blocks ``[S, ..., nc, 16, 16]`` -> bands c[δ, j] = M[j + δ, j] in the kernels' layout."""
    return _to_chunk_rows(_take(M.swapaxes(-1, -2), (_R + _C) % _SUB, _R + _C < _SUB))  # [.., j, δ]


def _row_masks(zones, G):
    """Float32 ``[N, B, C]`` rows for the kernels: (reads the incoming state, writes the outgoing one,
    document count inside the chunk), from ``chunked._Zones`` (None: one document)."""
    shape = (*G.shape[:2], G.shape[-2])
    if zones.zone is None:
        return jnp.ones(shape, _F32), jnp.ones(shape, _F32), jnp.zeros(shape, _F32)
    return tuple(m[:, :, 0, :].astype(_F32) for m in (zones.reading_rows(), zones.writing_rows(), zones.zone))


class MosaicPasses:
    """The ``passes`` interface of ``kda_jax.ops.chunked`` on the state-pass and intra kernels."""

    def __init__(self, interpret: bool = False, fused_output: bool | None = None, intra_kernel: bool | None = None,
                 blocks_kernel: bool | None = None, factors_kernel: bool | None = None,
                 factored_diagonal: bool | None = None, factored_adjoint: bool | None = None,
                 cumsum_kernel: bool | None = None, bf16_operands: bool | None = None,
                 gate_floor_kernel: bool | None = None, inverse_in_blocks: bool | None = None,
                 wy_adjoint_kernel: bool | None = None, inter_adjoint_kernel: bool | None = None):
        self.interpret = bool(interpret)
        self.fused_output = FUSED_OUTPUT if fused_output is None else bool(fused_output)
        self.intra_kernel = INTRA_KERNEL if intra_kernel is None else bool(intra_kernel)
        self.blocks_kernel = BLOCKS_KERNEL if blocks_kernel is None else bool(blocks_kernel)
        self.factors_kernel = FACTORS_KERNEL if factors_kernel is None else bool(factors_kernel)
        self.factored_diagonal = blocks.FACTORED_DIAGONAL if factored_diagonal is None else bool(factored_diagonal)
        self.factored_adjoint = FACTORED_ADJOINT if factored_adjoint is None else bool(factored_adjoint)
        self.cumsum_kernel = CUMSUM_KERNEL if cumsum_kernel is None else bool(cumsum_kernel)
        self.bf16_operands = BF16_OPERANDS if bf16_operands is None else bool(bf16_operands)
        self.gradient_barrier = GRADIENT_BARRIER
        self.time_major = TIME_MAJOR
        self.gate_floor_kernel = GATE_FLOOR_KERNEL if gate_floor_kernel is None else bool(gate_floor_kernel)
        self.inverse_in_blocks = INVERSE_IN_BLOCKS if inverse_in_blocks is None else bool(inverse_in_blocks)
        self.wy_adjoint_kernel = WY_ADJOINT_KERNEL if wy_adjoint_kernel is None else bool(wy_adjoint_kernel)
        self.inter_adjoint_kernel = (INTER_ADJOINT_KERNEL if inter_adjoint_kernel is None
                                     else bool(inter_adjoint_kernel))

    def operand(self, x):
        return x.astype(_BF16) if self.bf16_operands else x

    def _layout(self, *xs):
        """Chunk-major operands as the kernels read them: in the caller's layout with ``TIME_MAJOR``
        (XLA folds the transposes into the caller's own arrays)."""
        return tuple(_from_chunks(x) for x in xs) if self.time_major else xs

    def _qk(self, q, k):
        """q (in k's dtype) and k as the kernels read them (``TIME_MAJOR``)."""
        return self._layout(q.astype(k.dtype), k)

    def gate_cumsum(self, a, chunk_size):
        # a arrives before the gate floor (the implementation ``floors_gate``); a floored a is unchanged
        if not self.cumsum_kernel or a.dtype != jnp.dtype(_F32):
            return ScanPasses.gate_cumsum(self, apply_gate_floor(a), chunk_size)
        if self.gate_floor_kernel:
            return cumsum.gate_cumsum(a, chunk_size, self.interpret, GATE_FLOOR)
        return cumsum.gate_cumsum(apply_gate_floor(a), chunk_size, self.interpret)

    def _blocks_kernel(self, gating, q, k, beta, zones, scale, inverse=None):
        G = gating.G
        _, _, zone = _row_masks(zones, G)
        return blocks.gated_blocks(*self._qk(q, k), G.astype(_F32), beta.astype(_F32), zone, scale=scale,
                                   interpret=self.interpret, factored=self.factored_diagonal, inverse=inverse)

    def gated_blocks(self, gating, q, k, qf, kf, beta, zones, scale):
        if not (self.intra_kernel and self.blocks_kernel):
            return ScanPasses.gated_blocks(self, gating, q, k, qf, kf, beta, zones, scale)
        Aqk, L = self._blocks_kernel(gating, q, k, beta, zones, scale)
        return Aqk.astype(gating.G.dtype), L.astype(gating.G.dtype)

    def intra_blocks(self, gating, q, k, qf, kf, beta, zones, scale):
        if not (self.inverse_in_blocks and self.intra_kernel and self.blocks_kernel):
            return ScanPasses.intra_blocks(self, gating, q, k, qf, kf, beta, zones, scale)
        # T in the dtype ``operand`` gives the GEMMs that read it (``INVERSE_IN_BLOCKS``)
        Aqk, T = self._blocks_kernel(gating, q, k, beta, zones, scale, inverse=_BF16 if self.bf16_operands else _F32)
        return Aqk.astype(gating.G.dtype), T

    def forward_factors(self, q, k, v, qf, kf, vf, beta, G, T, zones, scale):
        if not self.factors_kernel:
            W, U, Kd, gend, Qs = ScanPasses.forward_factors(self, q, k, v, qf, kf, vf, beta, G, T, zones, scale)
            W, U, Kd, Qs = (self.operand(x) for x in (W, U, Kd, Qs))  # what the state passes read
            return W, U, Kd, gend, Qs
        reads, writes, _ = _row_masks(zones, G)
        W, U, Kd, Qs = wy.forward_factors(q.astype(k.dtype), k, v.astype(k.dtype), G.astype(_F32), beta.astype(_F32),
                                          T.astype(_F32), reads, writes, scale=scale, interpret=self.interpret)
        return W, U, Kd, zones.carries_state(jnp.exp(G[..., -1, :])), Qs

    def wy_adjoint(self, dVn, h, T, k, v, kf, vf, beta, G, zones):
        if not self.wy_adjoint_kernel:
            return ScanPasses.wy_adjoint(self, dVn, h, T, k, v, kf, vf, beta, G, zones)
        reads, _, zone = _row_masks(zones, G)
        k, v = self._layout(k, v.astype(k.dtype))
        out = wy.wy_adjoint(k, v, G.astype(_F32), beta.astype(_F32), self.operand(T), h.astype(_BF16), dVn,
                            reads, zone, interpret=self.interpret)
        return tuple(x.astype(G.dtype) for x in out)

    def inter_adjoint(self, dO, h, Vn, dSn, q, k, qf, kf, G, gend, zones, scale):
        if not self.inter_adjoint_kernel:
            return ScanPasses.inter_adjoint(self, dO, h, Vn, dSn, q, k, qf, kf, G, gend, zones, scale)
        reads, writes, zone = _row_masks(zones, G)
        out = inter.inter_adjoint(*self._qk(q, k), G.astype(_F32), gend.astype(_F32), dO.astype(_BF16), h.astype(_BF16),
                                  Vn.astype(_BF16), dSn, reads, writes, zone, scale=scale, interpret=self.interpret)
        return tuple(x.astype(G.dtype) for x in out)

    def intra_diag(self, gating, q, k):
        if not self.intra_kernel:
            return ScanPasses.intra_diag(self, gating, q, k)
        band = intra.band_lower(*self._qk(q, k), gating.G.astype(_F32), interpret=self.interpret)
        return bands_to_blocks(band).astype(gating.G.dtype)

    def intra_diag_adjoint(self, gating, q, k, beta, dMs):
        if not self.intra_kernel:
            return ScanPasses.intra_diag_adjoint(self, gating, q, k, beta, dMs)
        dMd = _diag_blocks(dMs).astype(_F32)  # [2, ..., nc, 16, 16]
        nc = dMd.shape[-3]
        b = beta.astype(_F32).reshape(*beta.shape[:-1], nc, _SUB)[..., None]
        G = gating.G.astype(_F32)
        args = (*self._qk(q, k), G)
        if self.factored_adjoint:  # the bounded rows on the tensor cores, the bands the others
            safe_rows, safe_chunk = blocks.bounded_rows(G)
            bounded = safe_rows.reshape(*safe_rows.shape[:-1], nc, _SUB)[..., None] > 0  # row i
            dMd = jnp.where(bounded, 0.0, dMd)
        cols = jnp.stack([dMd[0] * b, dMd[1]])  # β_i folded into the L rows
        bands = (blocks_to_row_bands(dMd), blocks_to_col_bands(cols))
        if self.factored_adjoint:
            dL, dP = (x.astype(_F32) for x in dMs)
            rl, rp, col = adjoint.diagonal_adjoint(*args, *bands, dL, dP, beta.astype(_F32), safe_rows, safe_chunk,
                                                   interpret=self.interpret)
        else:
            rl, rp, col = intra.band_adjoint(*args, *bands, interpret=self.interpret)
        dt = gating.G.dtype
        return jnp.stack([rl, rp]).astype(dt), col.astype(dt)

    def forward(self, W, U, Kd, gend, h0):
        return state_pass.forward_pass(W.astype(_BF16), U.astype(_BF16), Kd.astype(_BF16), gend.astype(_F32),
                                       h0.astype(_F32), interpret=self.interpret)

    def forward_output(self, W, U, Kd, gend, h0, Qs, Aqk, out_dtype):
        # differentiated: the backward reruns ``forward`` on the same operands anyway (with the fused
        # kernel here forward+backward was 0.34 ms slower at the mid shape, benchmarks/NOTES.md v3)
        return ScanPasses.forward_output(self, W, U, Kd, gend, h0, self.operand(Qs), self.operand(Aqk), out_dtype)

    def forward_output_primal(self, W, U, Kd, gend, h0, Qs, Aqk, out_dtype):
        if not self.fused_output or not (self.interpret or (W.shape[-1], U.shape[-1]) in FUSED_OUTPUT_KV):
            return self.forward_output(W, U, Kd, gend, h0, Qs, Aqk, out_dtype)
        out = jnp.bfloat16 if jnp.dtype(out_dtype) == jnp.dtype(_BF16) else _F32
        o, S_T = state_pass.output_pass(W.astype(_BF16), U.astype(_BF16), Kd.astype(_BF16), gend.astype(_F32),
                                        h0.astype(_F32), Qs.astype(_BF16), Aqk.astype(_BF16), out_dtype=out,
                                        interpret=self.interpret, time_major=self.time_major)
        return (_to_chunks(o, W.shape[-2]) if self.time_major else o), S_T

    def reverse(self, dO, Aqk, Qs, Kd, W, gend, dS_T):
        dSn, dVn, dh0 = state_pass.reverse_pass(dO.astype(_BF16), Aqk.astype(_BF16), Qs.astype(_BF16),
                                                Kd.astype(_BF16), W.astype(_BF16), gend.astype(_F32),
                                                dS_T.astype(_F32), interpret=self.interpret)
        return dh0, dSn, dVn

    def gradients(self, dq, dk, dv, dG, dbeta):
        if not self.gradient_barrier:
            return dq, dk, dv, dG, dbeta
        # one fusion reads the chunk tensors they come from, not two (``GRADIENT_BARRIER``)
        return jax.lax.optimization_barrier((dq, dk, dv, dG, dbeta))

    def _key(self):
        return (self.interpret, self.fused_output, self.intra_kernel, self.blocks_kernel, self.factors_kernel,
                self.factored_diagonal, self.factored_adjoint, self.cumsum_kernel, self.bf16_operands,
                self.gradient_barrier, self.time_major, self.gate_floor_kernel, self.inverse_in_blocks,
                self.wy_adjoint_kernel, self.inter_adjoint_kernel)

    def __hash__(self):
        return hash((type(self), self._key()))

    def __eq__(self, other):
        return type(self) is type(other) and self._key() == other._key()


def kda_mosaic(q, k, v, g, beta, *, scale, initial_state=None, resets=None, chunk_size=64, interpret=False,
               fused_output=None, intra_kernel=None, blocks_kernel=None, factors_kernel=None, factored_diagonal=None,
               factored_adjoint=None, cumsum_kernel=None, bf16_operands=None, gate_floor_kernel=None,
               inverse_in_blocks=None, wy_adjoint_kernel=None, inter_adjoint_kernel=None):
    """Canonical inputs (``kda_jax.ops.inputs.canonicalize``; g floored or not: ``gate_cumsum`` applies
    the gate floor) -> (o, final state float32).

    Needs chunk_size 64 and K, V multiples of 64 (see ``supports``); ``interpret`` runs the
    kernels on CPU (tests); ``fused_output`` picks the forward kernel that also forms o for calls
    that are not differentiated (default ``FUSED_OUTPUT``); ``intra_kernel`` computes the diagonal sub-blocks of the gated
    products with the ``intra`` kernels (default ``INTRA_KERNEL``); ``blocks_kernel`` forms Aqk and L
    whole in ``blocks.gated_blocks`` (default ``BLOCKS_KERNEL``; needs ``intra_kernel``);
    ``factors_kernel`` forms the forward's W, U, Kd, Qs in ``wy.forward_factors`` (default ``FACTORS_KERNEL``);
    ``factored_diagonal``: in ``gated_blocks``, the diagonal sub-blocks of rows with bounded gates on the
    tensor cores (default ``blocks.FACTORED_DIAGONAL``); ``factored_adjoint``: the same in the backward's
    diagonal adjoints (``adjoint.diagonal_adjoint``, default ``FACTORED_ADJOINT``); ``cumsum_kernel``: G and
    the gate's gradient by ``cumsum.gate_cumsum`` (default ``CUMSUM_KERNEL``); ``bf16_operands``: the XLA
    GEMMs around the kernels read bf16 (default ``BF16_OPERANDS``); ``gate_floor_kernel``: the gate floor
    inside the cumsum kernel (default ``GATE_FLOOR_KERNEL``); ``inverse_in_blocks``: T = (I + L)⁻¹ in
    ``gated_blocks``' epilogue (default ``INVERSE_IN_BLOCKS``); ``wy_adjoint_kernel``: the backward through
    W, U and the inverse in ``wy.wy_adjoint`` (default ``WY_ADJOINT_KERNEL``); ``inter_adjoint_kernel``: the
    backward's parts through the chunk states in ``inter.inter_adjoint`` (default ``INTER_ADJOINT_KERNEL``).
    """
    passes = MosaicPasses(interpret, fused_output, intra_kernel, blocks_kernel, factors_kernel, factored_diagonal,
                          factored_adjoint, cumsum_kernel, bf16_operands, gate_floor_kernel, inverse_in_blocks,
                          wy_adjoint_kernel, inter_adjoint_kernel)
    return kda_chunked(q, k, v, g, beta, scale=scale, initial_state=initial_state, resets=resets,
                       chunk_size=chunk_size, passes=passes)
