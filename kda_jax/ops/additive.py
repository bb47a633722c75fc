"""Scalar-decay linear attention with an additive write: the "Mamba2-like" baseline.

The third rule of the paper's synthetic-task comparison (kimi_linear_model §5): KDA and GDN
update the state with the delta rule, this one simply adds. Per value head, with one log
decay g_t ≤ 0 per token (a_t = e^{g_t}) and the state S ``[K, V]``:

    S <- 0                                  where a new document starts (reset)
    S_t = a_t · S_{t−1} + β_t · k_t v_tᵀ      o_t = scale · S_tᵀ q_t   (read after the write)

Chunkwise form (chunk of C tokens, G_t = Σ_{s ≤ t} g_s the in-chunk inclusive cumsum, S the
state entering the chunk, G_C its last entry):

    A_ts = scale · (q_t · k_s) · e^{G_t − G_s} · β_s     for s ≤ t in the same document, else 0
    o_t  = scale · e^{G_t} · q_tᵀ S + Σ_s A_ts v_s
    S'   = e^{G_C} · S + Σ_s e^{G_C − G_s} β_s k_s v_sᵀ

There is no (I + L)⁻¹ and no WY representation: the intra-chunk term is one masked matrix.

Numerics:
* Every exponent is G_t − G_s with s ≤ t, G_t, or G_C − G_s; since g ≤ 0 and G is monotone,
  all are ≤ 0. Pairs outside the causal, same-document mask are replaced by −inf *before*
  ``exp``, so no positive difference is ever exponentiated and gates of −1000 give exact
  zeros (and zero gradients) instead of inf/NaN. Gates must be finite.
* Packed documents: G is the continuous in-chunk cumsum. Tokens are grouped into zones (the
  documents inside a chunk, 0 = the one continuing from the incoming state); cross-zone pairs
  are masked, rows outside zone 0 do not read S, rows outside the last zone do not write S',
  and a chunk containing a boundary does not carry S forward, so the state restarts exactly
  at every boundary, also inside a chunk.
* Accumulation in float32 (float64 when the inputs are float64, which the tests use to check
  the algorithm to 1e-10); outputs in v.dtype, the final state float32 (or float64).
* The intra-chunk terms and each chunk's own state contribution are formed for all chunks in
  parallel; only S ← γ_n · S + ΔS_n is serial (one ``lax.scan``). Gradients come from
  autodiff: the scan body is linear, so what it saves is the chunk-start states, the same
  ``[N, B, HV, K, V]`` that chunked KDA keeps; memory stays linear in T.

Inputs use the layouts of ``kda_jax.ops`` (q, k ``[B, T, H, K]``, v ``[B, T, HV, V]``, the
scalar gate and beta ``[B, T, HV]``) and the same pre-processing (``inputs.canonicalize`` with
the GDN gate: a = −exp(A_log[h]) · softplus(f + dt_bias)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kda_jax.ops.inputs import canonicalize, expand_heads, pad_time
from kda_jax.ops.reference import scan_recurrence

LINEAR_ATTN_IMPLS = ("auto", "chunked", "reference")


def check_chunk_size(chunk_size) -> None:
    """Any positive chunk size works for a scalar decay (there is no sub-chunk inverse)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


# ----------------------------------------------------------------------------------------------
# the oracle: one token at a time


def linear_attn_step(S, q_t, k_t, v_t, g_t, beta_t, scale):
    """One token for a batch of heads. S ``[..., K, V]``; q_t, k_t ``[..., K]``; v_t ``[..., V]``;
    g_t, beta_t ``[...]``. Returns (o_t ``[..., V]``, new S)."""
    S = jnp.exp(g_t)[..., None, None] * S + (beta_t[..., None] * k_t)[..., :, None] * v_t[..., None, :]
    return jnp.einsum("...kv,...k->...v", S, scale * q_t), S


def linear_attn_reference(q, k, v, g, beta, *, scale, initial_state=None, resets=None, chunk_size=None):
    """The recurrence as a ``lax.scan`` over time, in the promoted dtype (at least float32).

    q, k ``[B, T, H, K]``; v ``[B, T, HV, V]``; g, beta ``[B, T, HV]`` (activated); resets
    ``[B, T]`` bool or None. Returns (o ``[B, T, HV, V]`` in v.dtype, final state).
    """
    del chunk_size  # the recurrence has no chunks
    return scan_recurrence(linear_attn_step, q, k, v, g, beta, scale=scale, initial_state=initial_state,
                           resets=resets)


# ----------------------------------------------------------------------------------------------
# the chunkwise-parallel form (training / prefill)


def linear_attn_chunked(q, k, v, g, beta, *, scale, initial_state=None, resets=None, chunk_size=64):
    """Chunkwise form of the module docstring; same arguments and results as ``linear_attn_reference``.

    Any T: the tail is padded with no-op tokens (g = 0, q = k = v = β = 0, no reset).
    """
    check_chunk_size(chunk_size)
    B, T, HV, V = v.shape
    K, C = q.shape[-1], chunk_size
    acc = jnp.result_type(jnp.float32, q.dtype, k.dtype, v.dtype)
    # [B, T, HV, ...] -> [B, N, HV, C, ...]
    blocks = lambda x: jnp.swapaxes(pad_time(x, C).reshape(B, -1, C, *x.shape[2:]), 2, 3).astype(acc)
    qc, kc, vc = blocks(expand_heads(q, HV)), blocks(expand_heads(k, HV)), blocks(v)
    bc = blocks(beta)
    G = jnp.cumsum(blocks(g), axis=-1)                                   # [B, N, HV, C]

    pair = np.tril(np.ones((C, C), bool))
    reads = writes = carries = True
    if resets is not None:
        zone = jnp.cumsum(pad_time(resets, C).reshape(B, -1, 1, C).astype(jnp.int32), axis=-1)  # [B, N, 1, C]
        pair = pair & (zone[..., :, None] == zone[..., None, :])
        reads, writes, carries = zone == 0, zone == zone[..., -1:], zone[..., -1] == 0

    G_end = G[..., -1:]
    decay = jnp.exp(jnp.where(pair, G[..., :, None] - G[..., None, :], -jnp.inf))
    A = scale * jnp.einsum("bnhtk,bnhsk->bnhts", qc, kc) * decay * bc[..., None, :]
    q_in = scale * qc * jnp.where(reads, jnp.exp(G), 0.0)[..., None]     # reads the incoming state
    k_out = kc * jnp.where(writes, jnp.exp(G_end - G) * bc, 0.0)[..., None]  # writes the outgoing one
    gamma = jnp.where(carries, jnp.exp(G_end[..., 0]), 0.0)              # [B, N, HV]
    dS = jnp.einsum("bnhsk,bnhsv->nbhkv", k_out, vc)

    def step(S, xs):
        gamma_n, dS_n = xs
        return gamma_n[..., None, None] * S + dS_n, S

    S0 = jnp.zeros((B, HV, K, V), acc) if initial_state is None else initial_state.astype(acc)
    S_T, h = jax.lax.scan(step, S0, (jnp.moveaxis(gamma, 1, 0), dS))    # h [N, B, HV, K, V]: chunk starts
    o = A @ vc + jnp.einsum("bnhtk,nbhkv->bnhtv", q_in, h)
    o = jnp.swapaxes(o, 2, 3).reshape(B, -1, HV, V)[:, :T]
    return o.astype(v.dtype), S_T


# ----------------------------------------------------------------------------------------------
# public entry points


def _canonical(q, k, v, g, beta, **kw):
    c = canonicalize(q, k, v, g, beta, scalar_gate=True, **kw)
    return c, c.g[..., 0]  # canonicalize broadcasts the scalar gate over K; the rule needs it once


def linear_attn(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, segment_ids=None,
                use_qk_l2norm=False, A_log=None, dt_bias=None, beta_is_logit=False, chunk_size=64, impl="auto"):
    """Scalar-decay linear attention (no delta rule) over a batch of sequences.

    Arguments mean what they mean in ``kda_jax.ops.gdn``: g ``[B, T, HV]`` is the log decay
    (≤ 0), or with ``A_log`` ``[HV]`` (and dt_bias ``[HV]``) the raw gate input, activated as
    −exp(A_log) · softplus(g + dt_bias). ``chunk_size`` is any positive int; ``impl`` is "auto"
    (= "chunked") or "reference" (the token loop).

    Returns (o ``[B, T, HV, V]`` in v.dtype, final state ``[B, HV, K, V]`` float32 or None).
    """
    if impl not in LINEAR_ATTN_IMPLS:
        raise ValueError(f"linear_attn impl must be one of {LINEAR_ATTN_IMPLS}, got {impl!r}")
    check_chunk_size(chunk_size)
    c, a = _canonical(q, k, v, g, beta, scale=scale, initial_state=initial_state, segment_ids=segment_ids,
                      use_qk_l2norm=use_qk_l2norm, A_log=A_log, dt_bias=dt_bias, beta_is_logit=beta_is_logit)
    fn = linear_attn_reference if impl == "reference" else linear_attn_chunked
    o, S_T = fn(c.q, c.k, c.v, a, c.beta, scale=c.scale, initial_state=c.initial_state, resets=c.resets,
                chunk_size=chunk_size)
    return o, (S_T.astype(jnp.float32) if output_final_state else None)


def linear_attn_decode(q, k, v, g, beta, state, *, scale=None, use_qk_l2norm=False, A_log=None, dt_bias=None,
                       beta_is_logit=False):
    """Advance float32 ``state`` ``[B, HV, K, V]`` by the tokens of q ``[B, S, H, K]`` (S ≥ 1, small).

    The recurrence of ``linear_attn_step`` on a float32 state; jit with the state donated to
    update it in place. Returns (o ``[B, S, HV, V]`` in v.dtype, new float32 state).
    """
    if state is None:
        raise ValueError("state must be a float32 array [B, HV, K, V]; use zeros for a new sequence")
    c, a = _canonical(q, k, v, g, beta, scale=scale, initial_state=state, use_qk_l2norm=use_qk_l2norm,
                      A_log=A_log, dt_bias=dt_bias, beta_is_logit=beta_is_logit)
    HV = c.v.shape[2]
    f32 = lambda x: x.astype(jnp.float32)
    xs = tuple(jnp.moveaxis(f32(x), 1, 0) for x in (expand_heads(c.q, HV), expand_heads(c.k, HV), c.v, a, c.beta))

    def step(S, x):
        o, S = linear_attn_step(S, *x, c.scale)
        return S, o

    S, o = jax.lax.scan(step, c.initial_state, xs)
    return jnp.moveaxis(o, 0, 1).astype(c.v.dtype), S
