"""Recurrent KDA update for inference: one token or a few tokens per call (kda_spec §6.2).

Decode is bound by state traffic (128 KB of float32 state per head per token for K = V = 128),
so it is exactly the recurrence of ``reference.recurrent_step`` on a float32 state, run over
the few new tokens. Callers that own the state should jit with the state donated, e.g.
``jax.jit(kda_decode, donate_argnames="state", static_argnames=(...))``, so XLA updates it in
place. ``impl="mosaic"`` runs the Mosaic GPU decode kernel (``kda_jax.kernels.decode``), which
reads and writes each state tile once for all the new tokens; ``impl="auto"`` takes it where
``kda_jax.kernels.decode_supports`` accepts the call, the kernel is enabled and the call has at
least ``kernels.DECODE_MIN_STATES`` states (batch × value heads) per device. Under a multi-device
context mesh (``jax.set_mesh``) the kernel runs per shard (``kda_jax.ops.sharded``: batch rows and
heads split) while ``kernels.DECODE_SHARDED`` is on (the default).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kda_jax.ops import sharded
from kda_jax.ops.inputs import canonicalize, expand_heads
from kda_jax.ops.reference import recurrent_step


def decode_canonical(q, k, v, g, beta, *, scale, state):
    """Canonical inputs with S = q.shape[1] new tokens -> (o ``[B, S, HV, V]``, new float32 state)."""
    HV = v.shape[2]
    q, k = expand_heads(q, HV).astype(jnp.float32), expand_heads(k, HV).astype(jnp.float32)
    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v.astype(jnp.float32), g, beta))

    def step(S, x):
        o, S = recurrent_step(S, *x, scale)
        return S, o

    S, o = jax.lax.scan(step, state.astype(jnp.float32), xs)
    return jnp.moveaxis(o, 0, 1).astype(v.dtype), S


def kda_decode(q, k, v, g, beta, state, *, scale=None, use_qk_l2norm=False, A_log=None, dt_bias=None,
               beta_is_logit=False, scalar_gate=False, impl="auto"):
    """Advance float32 ``state`` ``[B, HV, K, V]`` by the tokens of q ``[B, S, H, K]`` (S ≥ 1, small).

    Arguments mean what they mean in ``kda_jax.ops.kda``; ``impl`` is "auto", "xla" or "mosaic".
    Returns (o ``[B, S, HV, V]``, new state).
    """
    from kda_jax import kernels

    if state is None:
        raise ValueError("state must be a float32 array [B, HV, K, V]; use zeros for a new sequence")
    if impl not in ("auto", "xla", "mosaic"):
        raise ValueError(f"impl must be 'auto', 'xla' or 'mosaic', got {impl!r}")
    c = canonicalize(q, k, v, g, beta, scale=scale, initial_state=state, use_qk_l2norm=use_qk_l2norm,
                     A_log=A_log, dt_bias=dt_bias, beta_is_logit=beta_is_logit, scalar_gate=scalar_gate)
    B, S, HV, V = c.v.shape
    sp = sharded.plan(B, c.q.shape[2], HV)
    why = kernels.decode_supports(c.q.shape[-1], V, S, jax.default_backend(), 1 if sp else jax.device_count(),
                                  sharded=sp is not None)
    if impl == "mosaic" and why is not None:
        raise ValueError(f"impl='mosaic' does not support this decode call: {why}")
    states = (B // sp.batch_shards) * (HV // sp.head_shards) if sp else B * HV  # per device
    auto_kernel = kernels.DECODE_AUTO and why is None and states >= kernels.DECODE_MIN_STATES
    if impl == "mosaic" or (impl == "auto" and auto_kernel):
        args = (c.q, c.k, c.v, c.g, c.beta)
        o, new = sharded.run(_kernel_step, sp, *args, initial_state=c.initial_state, scale=float(c.scale)) if sp \
            else _kernel_step(*args, initial_state=c.initial_state, scale=float(c.scale))
        return o.astype(c.v.dtype), new
    return decode_canonical(c.q, c.k, c.v, c.g, c.beta, scale=c.scale, state=c.initial_state)


def _kernel_step(q, k, v, g, beta, *, initial_state, scale, resets=None):
    """The decode kernel on canonical inputs (one device, or one shard: ``sharded.run`` calls it)."""
    from kda_jax.kernels.decode import decode_step

    HV, f32 = v.shape[2], lambda x: x.astype(jnp.float32)
    return decode_step(f32(expand_heads(q, HV)), f32(expand_heads(k, HV)), f32(v), f32(g), f32(beta),
                       f32(initial_state), scale=scale)
