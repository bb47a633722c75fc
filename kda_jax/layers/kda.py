"""The KDA token mixer of Kimi Linear (kimi_linear_model §2.2), and its Gated DeltaNet twin.

From the normalised input x: q, k, v projections, each through its own causal short conv and
SiLU; per-head L2 norm of q and k and the 1/sqrt(K) query scale (inside ``kda_jax.ops``); the
per-channel forget gate ``g = -exp(A_log[h]) * softplus(f_b(f_a(x)) + dt_bias)`` and
``beta = sigmoid(b_proj(x))``, both activated in float32 inside the op; the low-rank output gate
``g_b(g_a(x))`` and the per-head gated RMSNorm with one weight shared by all heads; o_proj.

Ablation switches (paper Table 1): ``output_gate`` in {"sigmoid", "swish", "none"},
``conv_size=0`` (no short conv: SiLU directly after the projections, as flash-linear-attention
does), and ``gate="gdn"``: one decay per head and token from ``f_proj`` (hidden → H) with
A_log ``[H]`` and dt_bias ``[H]`` — Gated DeltaNet through the same op code path.
A_log, dt_bias, g and beta are float32 and never weight-decayed.

``rule`` picks the state update: "delta" (KDA / GDN) or "additive" (S ← a·S + dt·k vᵀ,
``ops.linear_attn``): with the scalar gate this is the "Mamba2-like" baseline of the paper's
synthetic tasks (kimi_linear_model §5), so "additive" requires ``gate="gdn"``. As in Mamba2's
discretisation (decay exp(−A·dt), input scaled by dt) the write strength is the decay's own step
dt = softplus(f_proj(x) + dt_bias), not a separate β: remembering longer also means writing
more weakly. (A free β made the baseline much stronger than Mamba2: on MQAR with 128-token rows
and 31 pairs, 600 steps on a CPU, it reached 53.0% answer accuracy against KDA's 25.2% and GDN's
4.4%; with the coupled write it peaks at 3.5%.) The additive rule has no b_proj; the cache is the
same for both rules.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from kda_jax import ops
from kda_jax.inference.cache import KDACache
from kda_jax.layers.common import Linear, param
from kda_jax.layers.conv import ShortConv
from kda_jax.layers.norms import GATE_ACTIVATIONS, GatedRMSNorm

GATES = ("kda", "gdn")
RULES = ("delta", "additive")


def a_log_init(key, shape, dtype):
    """A_log = log U(1, 16) (the fla / Mamba initialisation)."""
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)


def dt_bias_init(key, shape, dtype, dt_min=1e-3, dt_max=1e-1, dt_floor=1e-4):
    """Inverse softplus of dt ~ logU(dt_min, dt_max) clamped at dt_floor (fla / Mamba)."""
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), dt_floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


class KDAMixer(nnx.Module):
    def __init__(self, hidden: int, num_heads: int, head_dim: int, *, rngs: nnx.Rngs, conv_size: int = 4,
                 gate: str = "kda", rule: str = "delta", output_gate: str = "sigmoid", gate_rank: int | None = None,
                 norm_eps: float = 1e-5, chunk_size: int = 64, impl: str = "auto", dtype=jnp.float32,
                 param_dtype=jnp.float32):
        if gate not in GATES:
            raise ValueError(f"KDAMixer gate must be one of {GATES}, got {gate!r}")
        if rule not in RULES:
            raise ValueError(f"KDAMixer rule must be one of {RULES}, got {rule!r}")
        if rule == "additive" and gate != "gdn":
            raise ValueError(f"KDAMixer rule='additive' needs the scalar decay gate='gdn', got gate={gate!r}")
        if rule == "additive" and impl not in ops.LINEAR_ATTN_IMPLS:
            raise ValueError(f"KDAMixer rule='additive' runs ops.linear_attn: impl must be one of "
                             f"{ops.LINEAR_ATTN_IMPLS}, got {impl!r}")
        if output_gate not in GATE_ACTIVATIONS:
            raise ValueError(f"KDAMixer output_gate must be one of {GATE_ACTIVATIONS}, got {output_gate!r}")
        if conv_size < 0:
            raise ValueError(f"conv_size must be >= 0 (0 disables the short conv), got {conv_size}")
        self.hidden, self.num_heads, self.head_dim = hidden, num_heads, head_dim
        self.gate, self.rule, self.output_gate, self.conv_size = gate, rule, output_gate, conv_size
        self.chunk_size, self.impl, self.dtype = chunk_size, impl, dtype
        rank = head_dim if gate_rank is None else gate_rank
        width = num_heads * head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = Linear(hidden, width, ("embed", "heads"), **kw)
        self.k_proj = Linear(hidden, width, ("embed", "heads"), **kw)
        self.v_proj = Linear(hidden, width, ("embed", "heads"), **kw)
        if conv_size:
            self.q_conv1d = ShortConv(width, conv_size, **kw)
            self.k_conv1d = ShortConv(width, conv_size, **kw)
            self.v_conv1d = ShortConv(width, conv_size, **kw)
        f32 = dict(rngs=rngs, dtype=jnp.float32, param_dtype=param_dtype)
        if gate == "kda":
            self.f_a_proj = Linear(hidden, rank, ("embed", "gate_rank"), **f32)
            self.f_b_proj = Linear(rank, width, ("gate_rank", "heads"), **f32)
            self.dt_bias = param(rngs, dt_bias_init, (width,), ("heads",), no_decay=True)
        else:
            self.f_proj = Linear(hidden, num_heads, ("embed", None), **f32)
            self.dt_bias = param(rngs, dt_bias_init, (num_heads,), (None,), no_decay=True)
        self.A_log = param(rngs, a_log_init, (num_heads,), (None,), no_decay=True)
        if rule == "delta":  # the additive rule writes with the decay's own step (``_gate_beta``)
            self.b_proj = Linear(hidden, num_heads, ("embed", None), **f32)
        if output_gate != "none":
            self.g_a_proj = Linear(hidden, rank, ("embed", "gate_rank"), **kw)
            self.g_b_proj = Linear(rank, width, ("gate_rank", "heads"), **kw)
        self.o_norm = GatedRMSNorm(head_dim, activation=output_gate, eps=norm_eps, rngs=rngs,
                                   param_dtype=param_dtype)
        self.o_proj = Linear(width, hidden, ("heads", "embed"), **kw)

    def _heads(self, x):
        return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

    def _check(self, x):
        if x.ndim != 3 or x.shape[-1] != self.hidden:
            raise ValueError(f"KDAMixer expects x of shape [B, T, {self.hidden}], got {x.shape}")

    def _qkv(self, x, segment_ids, conv_cache):
        """q, k, v ``[B, T, H, D]`` after the short convs, and the convs' new caches (a tuple of 3, or ())."""
        out, caches = [], []
        for i, (proj, conv) in enumerate(((self.q_proj, "q_conv1d"), (self.k_proj, "k_conv1d"), (self.v_proj, "v_conv1d"))):
            y = proj(x)
            if self.conv_size:
                y, c = getattr(self, conv)(y, segment_ids, None if conv_cache is None else conv_cache[i])
                caches.append(c)
            else:
                y = jax.nn.silu(y)
            out.append(self._heads(y))
        return out, tuple(caches)

    def _gate_beta(self, x):
        g = self._heads(self.f_b_proj(self.f_a_proj(x))) if self.gate == "kda" else self.f_proj(x)
        gate_args = dict(A_log=self.A_log[...], dt_bias=self.dt_bias[...], beta_is_logit=True, use_qk_l2norm=True)
        if self.rule == "additive":  # Mamba2's discretisation: write strength = the decay's step dt
            dt = jax.nn.softplus(g.astype(jnp.float32) + self.dt_bias[...])
            return g, dt, dict(gate_args, beta_is_logit=False)
        return g, self.b_proj(x), gate_args

    def _output(self, o, x):
        gate = self._heads(self.g_b_proj(self.g_a_proj(x))) if self.output_gate != "none" else None
        o = self.o_norm(o, gate)
        return self.o_proj(o.reshape(*o.shape[:-2], -1))

    def _chunked(self, x, segment_ids, final_state, init=None):
        """The chunked op over x; ``init`` = (state, conv caches) before x (zeros when None)."""
        (q, k, v), conv = self._qkv(x, segment_ids, None if init is None else init[1])
        g, beta, gate_args = self._gate_beta(x)
        op = ops.linear_attn if self.rule == "additive" else ops.kda if self.gate == "kda" else ops.gdn
        o, S = op(q, k, v, g, beta, segment_ids=segment_ids, chunk_size=self.chunk_size, impl=self.impl,
                  initial_state=None if init is None else init[0], output_final_state=final_state, **gate_args)
        return self._output(o, x), S, conv

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """x ``[B, T, hidden]`` (already normalised) → ``[B, T, hidden]``."""
        self._check(x)
        return self._chunked(x, segment_ids, False)[0]

    def _last_document_conv(self, conv, segment_ids):
        """Zero the conv-cache entries (the last W-1 inputs) outside each row's last document."""
        if not conv or segment_ids is None:
            return conv
        P = self.conv_size - 1
        seg = jnp.concatenate([jnp.repeat(segment_ids[:, :1], P, axis=1), segment_ids], axis=1)[:, -P:]
        same = (seg == segment_ids[:, -1:])[..., None]
        return tuple(jnp.where(same, c, 0) for c in conv)

    def prefill(self, x: jax.Array, segment_ids: jax.Array | None = None, *,
                segment: int | None = None) -> tuple[jax.Array, KDACache]:
        """``__call__`` that also returns the cache after the last token: the float32 state and the
        short convs' last inputs, both of each row's last document (earlier documents are zeroed).

        ``segment``: run the prompt in time segments of that many tokens (a ``lax.scan`` carrying
        the state and conv caches, reset where a segment starts a new document), so the op's
        temporaries — its per-channel sub-chunk decay ratios are ~128 KB per token and head group
        in float32 — are those of one segment, whatever T. Same result as one call.
        """
        self._check(x)
        B, T, _ = x.shape
        if segment is None or T <= segment:
            y, S, conv = self._chunked(x, segment_ids, True)
            return y, KDACache(state=S, conv=self._last_document_conv(conv, segment_ids))
        n = -(-T // segment)
        seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        # front padding: its own document (id below the first), so it never reaches the prompt
        x = jnp.pad(x, ((0, 0), (n * segment - T, 0), (0, 0)))
        seg = jnp.concatenate([jnp.broadcast_to(seg[:, :1] - 1, (B, n * segment - T)), seg], axis=1)
        xs = x.reshape(B, n, segment, -1).swapaxes(0, 1)
        ss = seg.reshape(B, n, segment).swapaxes(0, 1)
        S0 = jnp.zeros((B, self.num_heads, self.head_dim, self.head_dim), jnp.float32)
        conv0 = tuple(jnp.zeros((B, self.conv_size - 1, self.num_heads * self.head_dim), x.dtype)
                      for _ in range(3 if self.conv_size else 0))

        def body(carry, inputs):
            S, conv, prev_doc = carry
            x_i, s_i = inputs
            keep = prev_doc == s_i[:, 0]  # the carried state belongs to this segment's first document
            S = jnp.where(keep[:, None, None, None], S, 0.0)
            conv = tuple(jnp.where(keep[:, None, None], c, 0).astype(x.dtype) for c in conv)
            y_i, S, conv = self._chunked(x_i, s_i, True, (S, conv))
            conv = tuple(c.astype(x.dtype) for c in self._last_document_conv(conv, s_i))
            return (S, conv, s_i[:, -1]), y_i

        (S, conv, _), ys = jax.lax.scan(body, (S0, conv0, ss[0, :, 0]), (xs, ss))
        y = ys.swapaxes(0, 1).reshape(B, n * segment, -1)[:, n * segment - T:]
        return y, KDACache(state=S, conv=conv)

    def decode(self, x: jax.Array, cache: KDACache) -> tuple[jax.Array, KDACache]:
        """x ``[B, S, hidden]``: S new tokens after the cached ones (recurrent update, ``ops.kda_decode``
        or, for the additive rule, ``ops.linear_attn_decode``)."""
        self._check(x)
        (q, k, v), conv = self._qkv(x, None, cache.conv)
        g, beta, gate_args = self._gate_beta(x)
        if self.rule == "additive":
            o, S = ops.linear_attn_decode(q, k, v, g, beta, cache.state, **gate_args)
        else:
            o, S = ops.kda_decode(q, k, v, g, beta, cache.state, scalar_gate=self.gate != "kda", **gate_args)
        return self._output(o, x), KDACache(state=S, conv=conv)
