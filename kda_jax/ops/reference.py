"""Token-by-token KDA recurrence (kda_spec §1.2): the oracle every fast path is tested against.

Per value head and token t, with the state S ``[K, V]``:

    S <- 0                      where a new document starts (reset)
    S <- Diag(exp(g_t)) S       decay first
    S <- S + beta_t k_t (v_t - S^T k_t)^T
    o_t = S^T (scale * q_t)     read after the write

Everything runs in the promoted dtype of the inputs and at least float32 (float64 when the
caller enables x64 and passes float64 arrays, as the tests do). No numerical tricks: this
is the definition, written as one ``lax.scan`` over time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kda_jax.ops.inputs import expand_heads


def recurrent_step(S, q_t, k_t, v_t, g_t, beta_t, scale):
    """One token of §1.2 for a batch of heads. S ``[..., K, V]``; q_t, k_t, g_t ``[..., K]``;
    v_t ``[..., V]``; beta_t ``[...]``. Returns (o_t ``[..., V]``, new S)."""
    S = jnp.exp(g_t)[..., :, None] * S
    r = v_t - jnp.einsum("...kv,...k->...v", S, k_t)
    S = S + (beta_t[..., None] * k_t)[..., :, None] * r[..., None, :]
    o = jnp.einsum("...kv,...k->...v", S, scale * q_t)
    return o, S


def scan_recurrence(step_fn, q, k, v, g, beta, *, scale, initial_state=None, resets=None):
    """A token-by-token recurrence as a ``lax.scan`` over time, in the promoted dtype (≥ float32).

    ``step_fn(S, q_t, k_t, v_t, g_t, beta_t, scale) -> (o_t, S)`` is one token for a batch of heads;
    inputs are canonical (``inputs.canonicalize``); a reset zeroes the state before its token.
    Returns (o ``[B, T, HV, V]`` in v.dtype, S_T).
    """
    B, T, HV, V = v.shape
    K, out_dtype = q.shape[-1], v.dtype
    dt = jnp.result_type(q.dtype, k.dtype, v.dtype, jnp.float32)
    q, k = expand_heads(q, HV).astype(dt), expand_heads(k, HV).astype(dt)
    v, g, beta = v.astype(dt), g.astype(dt), beta.astype(dt)
    S0 = jnp.zeros((B, HV, K, V), dt) if initial_state is None else initial_state.astype(dt)
    rs = jnp.zeros((B, T), bool) if resets is None else resets

    def step(S, xs):
        q_t, k_t, v_t, g_t, b_t, r_t = xs
        S = jnp.where(r_t[:, None, None, None], 0.0, S)
        return step_fn(S, q_t, k_t, v_t, g_t, b_t, scale)[::-1]

    time_major = lambda x: jnp.moveaxis(x, 1, 0)
    S_T, o = jax.lax.scan(step, S0, tuple(map(time_major, (q, k, v, g, beta, rs))))
    return jnp.moveaxis(o, 0, 1).astype(out_dtype), S_T


def kda_reference(q, k, v, g, beta, *, scale, initial_state=None, resets=None, chunk_size=None):
    """Canonical inputs (see ``inputs.canonicalize``) -> (o ``[B, T, HV, V]`` in v.dtype, S_T)."""
    del chunk_size  # the recurrence has no chunks
    return scan_recurrence(recurrent_step, q, k, v, g, beta, scale=scale, initial_state=initial_state, resets=resets)
