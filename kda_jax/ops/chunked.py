"""Chunkwise-parallel KDA in pure JAX with a hand-written backward (kda_spec §3 and §4).

The sequence is cut into chunks of C ∈ {32, 64} tokens (16-token sub-chunks inside). Per chunk
and value head, with G the inclusive in-chunk cumsum of the log decay a (§3.1):

    Aqk = s·tril(Σ_d Q_id K_jd e^{G_id−G_jd})        L = strict_tril(β_i Σ_d K_id K_jd e^{G_id−G_jd})
    T = (I + L)⁻¹      W = T·Diag(β)(K⊙Γ)      U = T·Diag(β)V      Kd = K⊙e^{G_end−G}
    Vn = U − W·S       O = s(Q⊙Γ)·S + Aqk·Vn    S ← e^{G_end}⊙S + Kdᵀ·Vn     (lax.scan over chunks)

Numerics (§3.5):
* The decay sits inside the sum over channels, so Aqk and L are never built from a
  ``[C, C, K]`` tensor over the whole chunk. Off-diagonal 16×16 blocks factor
  e^{G_i−G_j} = e^{G_i−G_n}·e^{G_n−G_j} around the first row n of the query sub-chunk, so both
  factors are ≤ 1 and the block is one matmul; the diagonal 16×16 blocks are computed exactly,
  elementwise, from e^{G_i−G_j} with j ≤ i. Every exponent is ≤ 0 and masked entries are
  removed with ``where`` before ``exp``, so gates of −1000 (or −inf-like decays) are safe.
* Packed documents (segment ids): G is the *continuous* in-chunk cumsum, which is monotone, so
  no exponent is ever positive across a document boundary (cf. sglang-jax#1587). Tokens are
  grouped into "zones" (documents inside the chunk); pairs across zones are removed from Aqk
  and L with ``where``, rows outside the first zone do not read the incoming state, rows
  outside the last zone do not write the outgoing state, and a chunk containing a boundary
  does not carry the old state forward. The state therefore restarts exactly at every
  boundary, anywhere inside a chunk.
* G, Aqk, L, the triangular inverse, W, U, the state and every gradient are float32 (float64
  when the inputs are float64, which the tests use to check the algorithm to 1e-10). Matmuls
  use the backend's default precision, except the inverse, which uses HIGHEST; a ``passes`` object
  may round what the GEMMs of W, U and of the backward read (``passes.operand``: bf16 on the GPU
  kernels' path, as their own products do), always accumulating in float32.
* T = (I + L)⁻¹ (§3.4): 16×16 diagonal blocks by row-wise forward substitution, then neighbouring
  blocks merged pairwise, 16 → 32 → 64 (``_unit_lower_inverse``; ``passes.intra_blocks`` may form
  Aqk and T together instead).

Memory (§4.1): the forward saves q, k, v, G, β, the initial state, Aqk and T (2·C floats per
token-head beyond the inputs: G takes the place of a); the backward recomputes W, U, Kd and the
chunk states h, then sweeps the chunks in reverse carrying dS. Peak memory is linear in T.
G = ``passes.gate_cumsum`` of a (differentiable; its adjoint is the reverse in-chunk sum).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kda_jax.ops.inputs import expand_heads, pad_time

SUB = 16
# Chunks per iteration of the sequential state loops. On GPU each loop iteration costs a host
# round trip for the trip condition, so unrolling cuts the per-chunk latency (benchmarks/kda_kernels.py
# times 1 vs the default side by side).
SCAN_UNROLL = 8
_HIGHEST = jax.lax.Precision.HIGHEST
_CAUSAL_SUB = np.tril(np.ones((SUB, SUB), bool))


def _same(x: jax.Array) -> jax.Array:
    return x


# ----------------------------------------------------------------------------------------------
# layout helpers: [B, T, HV, D] <-> chunk-major [N, B, HV, C, D]


def _to_chunks(x: jax.Array, C: int) -> jax.Array:
    B, T, HV, D = x.shape
    return x.reshape(B, T // C, C, HV, D).transpose(1, 0, 3, 2, 4)


def _from_chunks(x: jax.Array) -> jax.Array:
    N, B, HV, C, D = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(B, N * C, HV, D)


def _mT(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _diag_blocks(M: jax.Array, size: int = SUB) -> jax.Array:
    """[..., C, C] -> its ``size``×``size`` diagonal blocks [..., C/size, size, size]."""
    nc = M.shape[-1] // size
    Mb = M.reshape(*M.shape[:-2], nc, size, nc, size)
    return jnp.moveaxis(jnp.diagonal(Mb, axis1=-4, axis2=-2), -1, -3)


def _block_diag(D: jax.Array) -> jax.Array:
    """[..., nc, 16, 16] -> block-diagonal [..., C, C]."""
    nc = D.shape[-3]
    eye = jnp.eye(nc, dtype=D.dtype)
    full = D[..., :, :, None, :] * eye[:, None, :, None]
    return full.reshape(*D.shape[:-3], nc * SUB, nc * SUB)


# ----------------------------------------------------------------------------------------------
# document zones inside a chunk


class _Zones:
    """Masks that restart the state at document boundaries inside chunks (module docstring).

    ``zone`` is ``[N, B, 1, C]`` int: the number of document starts in the chunk up to and
    including each row (0 = the document that continues from the incoming state), or None.
    """

    def __init__(self, zone: jax.Array | None):
        self.zone = zone

    def pair(self, M: jax.Array, strict: bool) -> jax.Array:
        C = M.shape[-1]
        keep = np.tril(np.ones((C, C), bool), -1 if strict else 0)
        if self.zone is not None:
            keep = keep & (self.zone[..., :, None] == self.zone[..., None, :])
        return jnp.where(keep, M, 0.0)

    def reading_rows(self) -> jax.Array | None:  # [N, B, 1, C] bool: rows of the first zone (None: all)
        return None if self.zone is None else self.zone == 0

    def writing_rows(self) -> jax.Array | None:  # [N, B, 1, C] bool: rows of the last zone (None: all)
        return None if self.zone is None else self.zone == self.zone[..., -1:]

    def reads_state(self, x: jax.Array) -> jax.Array:  # rows of the first zone, x [..., C, D]
        return x if self.zone is None else jnp.where(self.reading_rows()[..., None], x, 0.0)

    def writes_state(self, x: jax.Array) -> jax.Array:  # rows of the last zone
        return x if self.zone is None else jnp.where(self.writing_rows()[..., None], x, 0.0)

    def carries_state(self, x: jax.Array) -> jax.Array:  # x [..., K]: zero if the chunk has a boundary
        return x if self.zone is None else jnp.where(self.zone[..., -1:] == 0, x, 0.0)


# ----------------------------------------------------------------------------------------------
# gated lower-triangular products  M_ij = Σ_d X_id Y_jd e^{G_id − G_jd}  (kda_spec §3.5, §4.2)


class _Gating:
    """Reference-point factors of e^{G_i − G_j} for the chunks of G ``[..., C, K]``.

    Off-diagonal sub-blocks: query rows i of sub-chunk p use ``qfac = e^{G_i − G_n(p)}`` and the
    key rows j < 16p before it use ``kfac[p] = e^{G_n(p) − G_j}``, with n(p) the first row of p;
    both are ≤ 1, and only the blocks below the diagonal are formed. Diagonal sub-blocks use
    e^{G_i − G_j}, j ≤ i, exactly; they come from the ``passes`` object (``ScanPasses``: the
    ``diag_*`` methods here, in XLA; GPU kernels in ``kda_jax.kernels``). Several row operands
    that share Y are stacked on a leading axis ``S`` so that each exponential is evaluated inside
    a single fused reduction.
    """

    def __init__(self, G: jax.Array):
        self.G = G
        C, K = G.shape[-2:]
        self.C, self.nc = C, C // SUB
        self.Gb = G.reshape(*G.shape[:-2], self.nc, SUB, K)
        Gn = self.Gb[..., 0, :]
        self.qfac = jnp.exp(self.Gb - Gn[..., None, :])
        self.kfac = {p: jnp.exp(Gn[..., p, None, :] - G[..., : p * SUB, :]) for p in range(1, self.nc)}

    def _dexp(self, transposed: bool = False) -> jax.Array:
        """[..., nc, 16, 16, K]: e^{G_i − G_j} for j ≤ i inside a sub-chunk, indexed [i, j] (or [j, i])."""
        Gi, Gj = self.Gb[..., :, None, :], self.Gb[..., None, :, :]
        if transposed:  # a different expression, so that each use keeps its own fused exp
            return jnp.exp(jnp.where(_CAUSAL_SUB.T[:, :, None], Gj - Gi, -jnp.inf))
        return jnp.exp(jnp.where(_CAUSAL_SUB[:, :, None], Gi - Gj, -jnp.inf))

    def _blocks(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-2], self.nc, SUB, x.shape[-1])

    def diag_lower(self, Xs: jax.Array, Y: jax.Array) -> jax.Array:
        """The diagonal sub-blocks of ``lower``: ``[S, ..., nc, 16, 16]``."""
        return jnp.sum(self._blocks(Xs)[..., :, None, :] * self._blocks(Y)[..., None, :, :] * self._dexp(), axis=-1)

    def diag_row_adjoint(self, dMs: jax.Array, Y: jax.Array) -> jax.Array:
        """The diagonal sub-blocks' part of ``row_adjoint``: ``[S, ..., C, K]``."""
        out = jnp.sum(_diag_blocks(dMs)[..., None] * self._blocks(Y)[..., None, :, :] * self._dexp(), axis=-2)
        return out.reshape(*out.shape[:-3], self.C, out.shape[-1])

    def diag_col_adjoint(self, dMs: jax.Array, Xs: jax.Array) -> jax.Array:
        """The diagonal sub-blocks' part of ``col_adjoint``: ``[..., C, K]``."""
        dMd = jnp.swapaxes(_diag_blocks(dMs), -1, -2)  # [S, ..., nc, j, i]
        out = jnp.sum(dMd[..., None] * self._blocks(Xs)[..., None, :, :] * self._dexp(transposed=True), axis=(0, -2))
        return out.reshape(*out.shape[:-3], self.C, out.shape[-1])

    def lower(self, Xs: jax.Array, Y: jax.Array, diag: jax.Array) -> jax.Array:
        """M_s = tril(Σ_d Xs_id Y_jd e^{G_id − G_jd}) for stacked Xs ``[S, ..., C, K]`` -> ``[S, ..., C, C]``,
        given its diagonal sub-blocks ``diag`` (``diag_lower``)."""
        Xb = self._blocks(Xs)
        rows = [jnp.zeros((*Xs.shape[:-2], SUB, self.C), Xs.dtype)]
        for p, kf in self.kfac.items():
            blk = jnp.einsum("s...id,...jd->s...ij", Xb[..., p, :, :] * self.qfac[..., p, :, :], Y[..., : p * SUB, :] * kf)
            rows.append(jnp.pad(blk, [(0, 0)] * (blk.ndim - 1) + [(0, self.C - p * SUB)]))
        return jnp.concatenate(rows, axis=-2) + _block_diag(diag)

    def row_adjoint(self, dMs: jax.Array, Y: jax.Array, diag: jax.Array, operand=_same) -> jax.Array:
        """Σ_j dM_ij Y_j e^{G_i − G_j} for stacked lower-triangular dMs ``[S, ..., C, C]`` (gradient w.r.t. X),
        given the diagonal sub-blocks' part ``diag`` (``diag_row_adjoint``); ``operand`` casts what the
        off-diagonal GEMMs read (they accumulate in the dtype of dMs)."""
        out = self._blocks(diag)
        blocks = [out[..., 0, :, :]]
        for p, kf in self.kfac.items():
            dM = dMs[..., p * SUB : (p + 1) * SUB, : p * SUB]
            off = jnp.einsum("s...ij,...jd->s...id", operand(dM), operand(Y[..., : p * SUB, :] * kf),
                             preferred_element_type=dMs.dtype)
            blocks.append(out[..., p, :, :] + self.qfac[..., p, :, :] * off)
        return jnp.concatenate(blocks, axis=-2)

    def col_adjoint(self, dMs: jax.Array, Xs: jax.Array, diag: jax.Array, operand=_same) -> jax.Array:
        """Σ_s Σ_i dM^s_ij Xs^s_i e^{G_i − G_j} for stacked lower-triangular dMs (gradient w.r.t. Y),
        given the diagonal sub-blocks' part ``diag`` (``diag_col_adjoint``); ``operand`` as in ``row_adjoint``."""
        Xb = self._blocks(Xs)
        out = diag
        for p, kf in self.kfac.items():
            dM = dMs[..., p * SUB : (p + 1) * SUB, : p * SUB]
            off = kf * jnp.einsum("s...ij,s...id->...jd", operand(dM), operand(Xb[..., p, :, :] * self.qfac[..., p, :, :]),
                                  preferred_element_type=dMs.dtype)
            out = out.at[..., : p * SUB, :].add(off)
        return out


def _unit_lower_inverse(L: jax.Array, out=_same) -> jax.Array:
    """T = (I + L)⁻¹ for strictly lower-triangular L ``[..., C, C]`` (kda_spec §3.4), passed through
    ``out`` (a cast) as it is assembled.

    The 16×16 diagonal blocks by row-wise forward substitution, then pairs of neighbouring blocks
    merged, 16 → 32 → … → C: ``[[A, 0], [L₂₁, B]]⁻¹ = [[A⁻¹, 0], [−B⁻¹·L₂₁·A⁻¹, B⁻¹]]`` — the terms of
    block forward substitution, as two batched GEMMs per level, each level written once (no
    updates in place of the whole T)."""
    X = -_diag_blocks(L)
    for i in range(2, SUB):  # rows 0 and 1 are final; each step uses finished rows only
        X = X.at[..., i, :].add(jnp.einsum("...m,...mj->...j", X[..., i, :i], X[..., :i, :], precision=_HIGHEST))
    D = X + jnp.eye(SUB, dtype=L.dtype)  # [..., nb, s, s], the inverses of the diagonal s-blocks
    while D.shape[-3] > 1:
        s = D.shape[-1]
        A, B = D[..., 0::2, :, :], D[..., 1::2, :, :]
        lower = _diag_blocks(L, 2 * s)[..., s:, :s]
        off = -jnp.matmul(B, jnp.matmul(lower, A, precision=_HIGHEST), precision=_HIGHEST)
        last = D.shape[-3] == 2
        A, B, off = (out(x) if last else x for x in (A, B, off))
        D = jnp.concatenate([jnp.concatenate([A, jnp.zeros_like(A)], -1), jnp.concatenate([off, B], -1)], -2)
    return D[..., 0, :, :]


# ----------------------------------------------------------------------------------------------
# the chunk pieces shared by forward and backward


def _intra(q, k, qf, kf, beta, gating: _Gating, zones: _Zones, scale, passes):
    """Aqk (lower incl. diagonal) and T = (I + L)⁻¹, both ``[..., C, C]``."""
    return passes.intra_blocks(gating, q, k, qf, kf, beta, zones, scale)


def _decays(G, zones: _Zones):
    """Γ = e^G on the rows that read the incoming state, E = e^{G_end − G} on the rows that write the
    outgoing one, and the state's decay over the chunk (zero where a document starts inside it)."""
    Gamma = zones.reads_state(jnp.exp(G))
    E = zones.writes_state(jnp.exp(G[..., -1:, :] - G))
    return Gamma, E, zones.carries_state(jnp.exp(G[..., -1, :]))


def _wy(kf, vf, beta, G, T, zones: _Zones, operand=_same):
    """W, U, Kd and the decay factors of one chunk (kda_spec §3.2 C); ``operand`` casts what the
    GEMMs read (W and U accumulate in the dtype of G)."""
    Gamma, E, gend = _decays(G, zones)
    Kb = beta[..., None] * kf * Gamma
    T = operand(T)
    W = jnp.matmul(T, operand(Kb), preferred_element_type=G.dtype)
    U = jnp.matmul(T, operand(beta[..., None] * vf), preferred_element_type=G.dtype)
    return dict(Gamma=Gamma, E=E, gend=gend, Kb=Kb, W=W, U=U, Kd=kf * E)


def chunk_outputs(Qs, Aqk, h, Vn):
    """o = Qs·h + Aqk·Vn per chunk (inter-chunk part from the state h, intra-chunk part from Vn),
    accumulated in float32 at least whatever the operands' dtype."""
    acc = jnp.promote_types(jnp.promote_types(Qs.dtype, Aqk.dtype), jnp.float32)
    return (jnp.matmul(Qs, h.astype(Qs.dtype), preferred_element_type=acc)
            + jnp.matmul(Aqk, Vn.astype(Aqk.dtype), preferred_element_type=acc))


class ScanPasses:
    """The two serial passes over the chunks as ``lax.scan`` (XLA), and the exact diagonal
    sub-blocks of the gated products (``_Gating``); ``kda_jax.kernels`` gives GPU kernels with the
    same interface. Chunk-major arrays ``[N, B, HV, C, D]``."""

    def gate_cumsum(self, a, chunk_size):
        """G ``[N, B, HV, C, K]``, the inclusive in-chunk cumsum of the log decay ``a [B, T, HV, K]``
        (T a multiple of ``chunk_size``), in a's dtype; differentiable."""
        return _chunk_cumsum(_to_chunks(a, chunk_size))

    def gated_blocks(self, gating: _Gating, q, k, qf, kf, beta, zones: _Zones, scale):
        """Aqk = s·tril(P) and L = β·strict_tril(R) of the q·k and k·k gated products, with pairs
        across documents removed, ``[..., C, C]`` (q, k in their input dtype; qf, kf, β in the
        dtype of G)."""
        P, R = gating.lower(jnp.stack([qf, kf]), kf, self.intra_diag(gating, q, k))
        return zones.pair(scale * P, strict=False), zones.pair(beta[..., None] * R, strict=True)

    def intra_blocks(self, gating: _Gating, q, k, qf, kf, beta, zones: _Zones, scale):
        """Aqk and T = (I + L)⁻¹ (``gated_blocks``, then ``_unit_lower_inverse``), T as ``operand``
        casts it (what every GEMM that reads it wants)."""
        Aqk, L = self.gated_blocks(gating, q, k, qf, kf, beta, zones, scale)
        return Aqk, _unit_lower_inverse(L, self.operand)

    def operand(self, x):
        """What the XLA GEMMs of the backward (and W, U) read: x itself here (float32, or float64 in
        the tests' exact check); ``MosaicPasses`` may round it to bf16."""
        return x

    def forward_factors(self, q, k, v, qf, kf, vf, beta, G, T, zones: _Zones, scale):
        """The forward state pass's operands (W, U, Kd, gend) and Qs = s·Q⊙Γ (``_wy``; q, k, v in
        their input dtype, the rest in the dtype of G). The backward reruns it for its state pass."""
        f = _wy(kf, vf, beta, G, T, zones, self.operand)
        return f["W"], f["U"], f["Kd"], f["gend"], scale * qf * f["Gamma"]

    def inter_adjoint(self, dO, h, Vn, dSn, q, k, qf, kf, G, gend, zones: _Zones, scale):
        """The parts that come through the chunk states (kda_spec §4.2 step 2), from dO, h, Vn and dSn
        (the gradient of the state leaving each chunk): ``(dq, dk, dG, dP)`` with dq = s·(dO·hᵀ)⊙Γ,
        dk = (Vn·dSnᵀ)⊙E, dG = Q⊙dq − K⊙dk plus, on each chunk's last row, the state decay's part
        Σ_v h⊙dSn·gend + Σ_i K⊙dk, and dP = s·dO·Vnᵀ (lower incl. the diagonal, per document). q, k in
        their input dtype (what kernels read), the rest in the dtype of G; gend the state's decay."""
        mm = lambda a, b: jnp.matmul(self.operand(a), self.operand(b), preferred_element_type=G.dtype)
        Gamma, E, _ = _decays(G, zones)
        dq = scale * mm(dO, _mT(h)) * Gamma
        dk = mm(Vn, _mT(dSn)) * E
        state = jnp.sum(h * dSn, axis=-1) * gend.astype(G.dtype) + jnp.sum(kf * dk, axis=-2)
        # added where the last row is, not by an update in place: it fuses with the consumers of dG
        last = np.arange(G.shape[-2])[:, None] == G.shape[-2] - 1
        dG = qf * dq - kf * dk + jnp.where(last, state[..., None, :], 0.0)
        return dq, dk, dG, scale * zones.pair(mm(dO, _mT(Vn)), strict=False)

    def wy_adjoint(self, dVn, h, T, k, v, kf, vf, beta, G, zones: _Zones):
        """Through W = T·Diag(β)(K⊙Γ) and U = T·Diag(β)V (kda_spec §4.2 step 3) and T = (I + L)⁻¹
        (steps 4-5), from dVn and the chunk states h: ``(dv, dβ, dk, dG, dL)``, the parts of dk and dG
        that come through Kb, and dL = −Tᵀ·dT·Tᵀ (strictly lower, per document). k, v in their input
        dtype (what kernels read), kf, vf, h, dVn in the dtype of G."""
        mm = lambda a, b: jnp.matmul(self.operand(a), self.operand(b), preferred_element_type=G.dtype)
        Gamma = zones.reads_state(jnp.exp(G))
        Kb = beta[..., None] * kf * Gamma
        dW = -mm(dVn, _mT(h))
        Tt = _mT(T)
        dKb = mm(Tt, dW)
        dUb = mm(Tt, dVn)
        dbeta = jnp.sum(dUb * vf, -1) + jnp.sum(dKb * kf * Gamma, -1)
        dT = mm(dW, _mT(Kb)) + mm(dVn, _mT(beta[..., None] * vf))
        dL = zones.pair(-mm(mm(Tt, dT), Tt), strict=True)
        return beta[..., None] * dUb, dbeta, beta[..., None] * Gamma * dKb, Kb * dKb, dL

    def intra_diag(self, gating: _Gating, q, k):
        """The 16×16 diagonal sub-blocks of the q·k and k·k gated products, ``[2, ..., nc, 16, 16]``
        (q, k in their input dtype; computed in the dtype of G)."""
        qf, kf = q.astype(gating.G.dtype), k.astype(gating.G.dtype)
        return gating.diag_lower(jnp.stack([qf, kf]), kf)

    def intra_diag_adjoint(self, gating: _Gating, q, k, beta, dMs):
        """Their adjoints for ``dMs = [dL, dP]`` (lower-triangular, ``[2, ..., C, C]``): the rows
        ``[2, ..., C, K]`` (Σ_j dM_ij k_j e^{G_i − G_j}) and the column sum ``[..., C, K]``
        (Σ_i (dL_ij β_i k_i + dP_ij q_i) e^{G_i − G_j}), diagonal sub-blocks only."""
        qf, kf = q.astype(gating.G.dtype), k.astype(gating.G.dtype)
        return (gating.diag_row_adjoint(dMs, kf),
                gating.diag_col_adjoint(dMs, jnp.stack([beta[..., None] * kf, qf])))

    def forward(self, W, U, Kd, gend, h0):
        """States at chunk starts h, pseudo-values Vn = U − W·h, and the final state."""

        def step(S, xs):
            W_n, U_n, Kd_n, g_n = xs
            Vn = U_n - W_n @ S
            return g_n[..., :, None] * S + _mT(Kd_n) @ Vn, (S, Vn)

        S_T, (h, Vn) = jax.lax.scan(step, h0, (W, U, Kd, gend), unroll=min(SCAN_UNROLL, W.shape[0]))
        return h, Vn, S_T

    def forward_output(self, W, U, Kd, gend, h0, Qs, Aqk, out_dtype):
        """The forward pass with the chunk outputs o = Qs·h + Aqk·Vn (Qs = s·Q⊙Γ) and the final
        state; ``out_dtype`` is what the caller will cast o to (kernels may store it directly)."""
        h, Vn, S_T = self.forward(W, U, Kd, gend, h0)
        return chunk_outputs(Qs, Aqk, h, Vn), S_T

    def forward_output_primal(self, W, U, Kd, gend, h0, Qs, Aqk, out_dtype):
        """``forward_output`` for a call that is not differentiated (no backward will follow)."""
        return self.forward_output(W, U, Kd, gend, h0, Qs, Aqk, out_dtype)

    def reverse(self, dO, Aqk, Qs, Kd, W, gend, dS_T):
        """Reverse sweep carrying dS (kda_spec §4.2 step 1): (dh0, dS leaving each chunk, dVn)."""

        def rstep(dS, xs):
            dVl, Kd_n, W_n, g_n, qd_n = xs
            dVn = dVl + Kd_n @ dS
            return qd_n + g_n[..., :, None] * dS - _mT(W_n) @ dVn, (dS, dVn)

        dh0, (dSn, dVn) = jax.lax.scan(rstep, dS_T, (_mT(Aqk) @ dO, Kd, W, gend, _mT(Qs) @ dO), reverse=True,
                                       unroll=min(SCAN_UNROLL, W.shape[0]))
        return dh0, dSn, dVn

    def gradients(self, dq, dk, dv, dG, dbeta):
        """The backward's chunk-major gradients as it hands them on (a hook for the kernels' path)."""
        return dq, dk, dv, dG, dbeta

    def __hash__(self):
        return hash(type(self))

    def __eq__(self, other):
        return type(self) is type(other)


SCAN = ScanPasses()


def _chunk_cumsum(x: jax.Array) -> jax.Array:
    """Inclusive cumulative sum over the rows of each chunk (axis −2), as a product with a triangular
    matrix of ones: one GEMM where XLA's GPU cumsum is a slow reduce-window (0.29 ms for the mid
    benchmark shape's 134 MB on an H100, benchmarks/NOTES.md); its transpose (the VJP) is the reverse
    sum. HIGHEST precision keeps it a float32 (float64) sum; rows past i meet exact zeros, so row i
    depends on rows ≤ i only."""
    C = x.shape[-2]
    return jnp.einsum("ij,...jd->...id", jnp.asarray(np.tril(np.ones((C, C))), x.dtype), x, precision=_HIGHEST)


def _accumulator(*xs) -> jnp.dtype:
    """float32, or float64 when an input is float64 (the tests' exact check of the algorithm)."""
    return jnp.result_type(jnp.float32, *(x.dtype for x in xs))


def _prepare(q, k, v, G, beta, zone):
    acc = G.dtype
    return q.astype(acc), k.astype(acc), v.astype(acc), beta.astype(acc), G, _Zones(zone)


# ----------------------------------------------------------------------------------------------
# custom VJP core on chunk-major inputs [N, B, HV, C, D]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _core(q, k, v, G, beta, h0, zone, scale, passes):
    # not differentiated (inference, evaluation): the passes may form o in a form that keeps none
    # of the chunk states the backward would recompute
    return _forward(q, k, v, G, beta, h0, zone, scale, passes, passes.forward_output_primal)[0]


def _core_fwd(q, k, v, G, beta, h0, zone, scale, passes):
    return _forward(q, k, v, G, beta, h0, zone, scale, passes, passes.forward_output)


def _forward(q, k, v, G, beta, h0, zone, scale, passes, forward_output):
    qf, kf, vf, bf, G, zones = _prepare(q, k, v, G, beta, zone)
    Aqk, T = _intra(q, k, qf, kf, bf, _Gating(G), zones, scale, passes)
    W, U, Kd, gend, Qs = passes.forward_factors(q, k, v, qf, kf, vf, bf, G, T, zones, scale)
    o, S_T = forward_output(W, U, Kd, gend, h0.astype(qf.dtype), Qs, Aqk, v.dtype)
    return (o.astype(v.dtype), S_T.astype(h0.dtype)), (q, k, v, G, beta, h0, zone, Aqk, T)


def _core_bwd(scale, passes, res, cts):
    q, k, v, G, beta, h0, zone, Aqk, T = res
    dO, dS_T = cts
    qf, kf, vf, bf, G, zones = _prepare(q, k, v, G, beta, zone)
    acc = qf.dtype
    gating = _Gating(G)
    # the forward's own state-pass operands, so that h and Vn are the states its o came from
    W, U, Kd, gend, Qs = passes.forward_factors(q, k, v, qf, kf, vf, bf, G, T, zones, scale)
    h, Vn, _ = passes.forward(W, U, Kd, gend, h0.astype(acc))
    h, Vn = h.astype(acc), Vn.astype(acc)
    dO = dO.astype(acc)
    dh0, dSn, dVn = passes.reverse(dO, Aqk, Qs, Kd, W, gend, dS_T.astype(acc))
    dSn, dVn = dSn.astype(acc), dVn.astype(acc)

    # inter-chunk parts (step 2) and dP = s·dO·Vnᵀ
    dq, dk, dG, dP = passes.inter_adjoint(dO, h, Vn, dSn, q, k, qf, kf, G, gend, zones, scale)

    # WY factors (step 3) and through the inverse to L (steps 4-5)
    dv, dbeta, dk_wy, dG_wy, dL = passes.wy_adjoint(dVn, h, T, k, v, kf, vf, bf, G, zones)
    dk = dk + dk_wy
    dG = dG + dG_wy

    # L and Aqk = s·P (step 6); L_ij = β_i Σ_d K_id K_jd e^{G_id − G_jd}
    dMs = jnp.stack([dL, dP])
    diag_rows, diag_col = passes.intra_diag_adjoint(gating, q, k, bf, dMs)
    row_L, row_P = gating.row_adjoint(dMs, kf, diag_rows, passes.operand)
    dbeta = dbeta + jnp.sum(kf * row_L, -1)
    dk = dk + bf[..., None] * row_L
    dq = dq + row_P
    dG = dG + bf[..., None] * kf * row_L + qf * row_P
    col = gating.col_adjoint(dMs, jnp.stack([bf[..., None] * kf, qf]), diag_col, passes.operand)
    dk = dk + col
    dG = dG - kf * col

    # dG whole (its last row took the state's part in ``inter_adjoint``); the reverse in-chunk sum to
    # the per-token log decay (step 7) is the VJP of ``passes.gate_cumsum``
    grads = passes.gradients(dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dG.astype(G.dtype),
                             dbeta.astype(beta.dtype))
    return (*grads, dh0.astype(h0.dtype), None)


_core.defvjp(_core_fwd, _core_bwd)


# ----------------------------------------------------------------------------------------------
# public entry on canonical inputs


def kda_chunked(q, k, v, g, beta, *, scale, initial_state=None, resets=None, chunk_size=64, passes=SCAN):
    """Canonical inputs (``inputs.canonicalize``) -> (o ``[B, T, HV, V]`` in v.dtype, final state f32).

    Any T: the tail is padded with no-op tokens (g = 0, q = k = v = β = 0, no reset). ``passes``
    runs the serial passes over the chunks (``ScanPasses`` here; GPU kernels in ``kda_jax.kernels``).
    """
    B, T, HV, V = v.shape
    K = q.shape[-1]
    C = chunk_size
    q, k = expand_heads(q, HV), expand_heads(k, HV)
    G = passes.gate_cumsum(pad_time(g, C).astype(_accumulator(q, k, v)), C)
    q, k, v = (_to_chunks(pad_time(x, C), C) for x in (q, k, v))
    beta = _to_chunks(pad_time(beta, C)[..., None], C)[..., 0]
    zone = None
    if resets is not None:
        r = pad_time(resets, C).reshape(B, -1, C)
        zone = jnp.cumsum(r.astype(jnp.int32), axis=-1).transpose(1, 0, 2)[:, :, None, :]
    h0 = jnp.zeros((B, HV, K, V), jnp.float32) if initial_state is None else initial_state
    o, S_T = _core(q, k, v, G, beta, h0, zone, float(scale), passes)
    return _from_chunks(o)[:, :T], S_T
