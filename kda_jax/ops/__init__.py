"""KDA and Gated DeltaNet as pure functions on arrays: the one front door ``kda(...)``.

``linear_attn(...)`` (module ``additive``) is the third rule of the synthetic-task comparison:
the GDN gate with an additive write instead of the delta rule (the "Mamba2-like" baseline), with
its decode ``linear_attn_decode``.

Layouts follow flash-linear-attention: q, k ``[B, T, H, K]``, v ``[B, T, HV, V]`` (HV a
multiple of H: grouped value heads), g ``[B, T, HV, K]`` per-token log decay (≤ 0),
beta ``[B, T, HV]``, states ``[B, HV, K, V]`` float32, segment_ids ``[B, T]`` int.
"""

from __future__ import annotations

from kda_jax.ops import registry, sharded
from kda_jax.ops.chunked import kda_chunked
from kda_jax.ops.decode import kda_decode
from kda_jax.ops.inputs import apply_gate_floor, canonicalize, check_chunk_size, kda_gate, l2_normalize
from kda_jax.ops.additive import (LINEAR_ATTN_IMPLS, linear_attn, linear_attn_chunked, linear_attn_decode,
                                     linear_attn_reference)
from kda_jax.ops.reference import kda_reference

__all__ = ["kda", "gdn", "kda_decode", "kda_gate", "l2_normalize", "registry", "kda_chunked", "kda_reference",
           "linear_attn", "linear_attn_decode", "linear_attn_chunked", "linear_attn_reference", "LINEAR_ATTN_IMPLS"]


def _always(call):
    return None


registry.register("chunked", kda_chunked, _always, priority=100)
registry.register("reference", kda_reference, _always, priority=200)

import kda_jax.kernels  # noqa: E402,F401  (registers the GPU kernels)


def kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, segment_ids=None,
        use_qk_l2norm=False, A_log=None, dt_bias=None, beta_is_logit=False, chunk_size=64, impl="auto",
        _scalar_gate=False):
    """Kimi Delta Attention (kda_spec §1.2) over a batch of sequences.

    Args:
      q, k: ``[B, T, H, K]`` queries and keys (any float dtype).
      v: ``[B, T, HV, V]`` values; value head h reads q/k head h // (HV // H).
      g: ``[B, T, HV, K]`` per-token log decay a ≤ 0, or, when ``A_log`` is given, the raw gate
        input f: then a = −exp(A_log[h]) · softplus(f + dt_bias) is applied inside (float32).
        Decays below ``inputs.GATE_FLOOR`` (−200; −inf included) are clamped to it: a full reset.
      beta: ``[B, T, HV]`` write strength in (0, 1), or logits when ``beta_is_logit``.
      scale: query scale, default K ** -0.5.
      initial_state: ``[B, HV, K, V]`` state before the first token (cast to float32).
      output_final_state: return the float32 state after the last token (else None).
      segment_ids: ``[B, T]`` int; the state restarts wherever the id changes (packed documents).
        The initial state belongs to the first document of each row, the final state to the last.
      use_qk_l2norm: L2-normalise q and k per head (eps 1e-6 inside the sqrt) first.
      A_log: ``[HV]`` and dt_bias ``[HV * K]``: the in-op Kimi Linear gate (see g).
      beta_is_logit: apply a sigmoid to beta first.
      chunk_size: 32 or 64, for chunked implementations.
      impl: "auto" (GPU kernel when one supports the call, else "chunked"), or a name from
        ``kda_jax.ops.registry.names()``. Under a multi-device context mesh (``jax.set_mesh``) a
        kernel runs per shard (``kda_jax.ops.sharded``: batch rows and heads split).

    Returns:
      (o ``[B, T, HV, V]`` in v.dtype, final state ``[B, HV, K, V]`` float32 or None).
    """
    check_chunk_size(chunk_size)
    c = canonicalize(q, k, v, g, beta, scale=scale, initial_state=initial_state, segment_ids=segment_ids,
                     use_qk_l2norm=use_qk_l2norm, A_log=A_log, dt_bias=dt_bias, beta_is_logit=beta_is_logit,
                     scalar_gate=_scalar_gate, floor_gate=False)
    sp = sharded.plan(c.q.shape[0], c.q.shape[2], c.v.shape[2])
    entry = registry.select(impl, registry.describe_call(c, chunk_size),
                            None if sp is None else registry.describe_call(c, chunk_size, sp))
    # the gate floor here, or inside an implementation that reads the gate in a pass of its own
    args = (c.q, c.k, c.v, c.g if entry.floors_gate else apply_gate_floor(c.g), c.beta)
    kw = dict(scale=c.scale, initial_state=c.initial_state, resets=c.resets, chunk_size=chunk_size)
    o, S_T = sharded.run(entry.fn, sp, *args, **kw) if entry.per_shard and sp else entry.fn(*args, **kw)
    return o, (S_T if output_final_state else None)


def gdn(q, k, v, g, beta, **kwargs):
    """Gated DeltaNet: ``kda`` with one log decay per token and value head, g ``[B, T, HV]``.

    With ``A_log`` the raw gate is activated as −exp(A_log) · softplus(g + dt_bias), dt_bias ``[HV]``.
    The gate is broadcast over K and the call runs through the same implementations as ``kda``.
    """
    return kda(q, k, v, g, beta, _scalar_gate=True, **kwargs)
