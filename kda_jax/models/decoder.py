"""``HybridDecoder``: the Kimi Linear language model (kimi_linear_model §2.1).

``x = embed(tokens)``; per layer ``h = x + mixer(norm_in(x))``, ``x = h + ffn(norm_post(h))``
with the mixer KDA (or GDN) or MLA by the 1-indexed layer lists and the FFN a dense SwiGLU
for the first ``first_k_dense_replace`` layers, then MoE; final norm; untied head. Layers are
heterogeneous, so they are a Python list (no scan over layers); activation checkpointing wraps
each block with the configured policy. Segment ids reach every mixer, so packed documents
never see each other; positions matter only for the RoPE ablation of MLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from kda_jax.inference.cache import Cache
from kda_jax.layers.common import param
from kda_jax.layers.kda import KDAMixer
from kda_jax.layers.mla import MLAttention
from kda_jax.layers.mlp import SwiGLU
from kda_jax.layers.moe import MoE, MoEStats
from kda_jax.layers.norms import RMSNorm
from kda_jax.models.config import ModelConfig

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@struct.dataclass
class DecoderOutput:
    logits: jax.Array                    # [B, T, vocab] float32
    router_stats: tuple[MoEStats, ...]   # one per MoE layer, in layer order

    @property
    def aux_loss(self) -> jax.Array:
        return sum((s.aux_loss for s in self.router_stats), jnp.zeros((), jnp.float32))


# Prompt tokens per KDA/FFN segment in ``HybridDecoder.prefill``: at the 653M scaling size one
# segment's temporaries are a few GiB (KDA's chunk tensors, the MoE's sorted buffers in float32),
# against 43–63 GiB for a whole 32K-token prompt (measured with XLA's memory analysis).
PREFILL_SEGMENT = 8192


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        c = config
        kw = dict(rngs=rngs, dtype=c.compute_dtype, param_dtype=c.params_dtype)
        self.is_kda, self.is_moe = c.is_kda_layer(layer), c.is_moe_layer(layer)
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, rngs=rngs, param_dtype=c.params_dtype)
        if self.is_kda:
            self.self_attn = KDAMixer(
                c.hidden_size, c.kda_num_heads, c.kda_head_dim, conv_size=c.short_conv_kernel_size, gate=c.kda_gate,
                rule=c.kda_rule, output_gate=c.output_gate, gate_rank=c.kda_gate_rank, norm_eps=c.rms_norm_eps,
                chunk_size=c.chunk_size, impl=c.kda_impl, **kw)
        else:
            self.self_attn = MLAttention(
                c.hidden_size, c.num_attention_heads, kv_lora_rank=c.kv_lora_rank, q_lora_rank=c.q_lora_rank,
                qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim,
                norm_eps=c.latent_norm_eps, use_rope=not c.mla_use_nope, rope_theta=c.rope_theta, impl=c.attn_impl, **kw)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, rngs=rngs,
                                                param_dtype=c.params_dtype)
        if self.is_moe:
            self.block_sparse_moe = MoE(
                c.hidden_size, num_experts=c.num_experts, top_k=c.num_experts_per_token,
                expert_dim=c.moe_intermediate_size, num_shared_experts=c.num_shared_experts,
                routed_scaling_factor=c.routed_scaling_factor, renormalize=c.moe_renormalize,
                router_bias_in_weights=c.router_bias_in_weights, seq_aux_loss_coef=c.seq_aux_loss_coef,
                dispatch=c.moe_dispatch, **kw)
        else:
            self.mlp = SwiGLU(c.hidden_size, c.intermediate_size, **kw)

    def __call__(self, x, segment_ids, positions, token_mask):
        h = self.input_layernorm(x)
        if self.is_kda:
            h = self.self_attn(h, segment_ids)
        else:
            h = self.self_attn(h, segment_ids, positions)
        return self._ffn(x + h, token_mask)

    def _ffn(self, x, token_mask):
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            h, stats = self.block_sparse_moe(h, token_mask)
        else:
            h, stats = self.mlp(h), None
        return x + h, stats

    def prefill(self, x, segment_ids, positions, max_len, cache_dtype, segment=None):
        """``__call__`` on a prompt that also builds this layer's cache. With ``segment``, the KDA
        mixer and the FFN run ``segment`` tokens at a time (MLA's prefill attention is already
        linear in T), so the temporaries stay those of one segment at any prompt length."""
        h = self.input_layernorm(x)
        if self.is_kda:
            h, cache = self.self_attn.prefill(h, segment_ids, segment=segment)
        else:
            h, cache = self.self_attn.prefill(h, segment_ids, positions, max_len, cache_dtype)
        x = x + h
        T = x.shape[1]
        if segment is None or T <= segment:
            return self._ffn(x, None)[0], cache
        n = -(-T // segment)  # position-wise: pad the tail, map over segments, drop the padding
        xs = jnp.pad(x, ((0, 0), (0, n * segment - T), (0, 0))).reshape(x.shape[0], n, segment, -1)
        ys = jax.lax.map(lambda x_i: self._ffn(x_i, None)[0], xs.swapaxes(0, 1))
        return ys.swapaxes(0, 1).reshape(x.shape[0], n * segment, -1)[:, :T], cache

    def decode(self, x, cache, start, pos, positions):
        h = self.input_layernorm(x)
        if self.is_kda:
            h, cache = self.self_attn.decode(h, cache)
        else:
            h, cache = self.self_attn.decode(h, cache, start, pos, positions)
        return self._ffn(x + h, None)[0], cache


class HybridDecoder(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        init = nnx.initializers.normal(stddev=c.initializer_range)
        self.embed_tokens = param(rngs, init, (c.vocab_size, c.hidden_size), ("vocab", "embed"), dtype=c.params_dtype)
        self.layers = nnx.List([Block(c, i, rngs=rngs) for i in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, rngs=rngs, param_dtype=c.params_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = param(rngs, init, (c.hidden_size, c.vocab_size), ("embed", "vocab"), dtype=c.params_dtype)

    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, token_mask: jax.Array | None = None) -> DecoderOutput:
        """tokens ``[B, T]`` int → logits ``[B, T, vocab]`` (float32) and the MoE router statistics.

        segment_ids ``[B, T]``: packed documents (none sees another). positions ``[B, T]``: used by
        the RoPE ablation only (default: 0..T-1, or restarting per document when segment ids are
        given). token_mask ``[B, T]``: tokens counted in router statistics (default: all).
        """
        c = self.config
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an integer array [B, T], got {tokens.dtype}{list(tokens.shape)}")
        B, T = tokens.shape
        for name, arr in (("segment_ids", segment_ids), ("positions", positions), ("token_mask", token_mask)):
            if arr is not None and arr.shape != (B, T):
                raise ValueError(f"{name} must have shape {(B, T)} like tokens, got {arr.shape}")
        if positions is None:
            positions = document_positions(segment_ids) if segment_ids is not None else \
                jnp.broadcast_to(jnp.arange(T), (B, T))
        x = jnp.take(self.embed_tokens[...], tokens, axis=0).astype(c.compute_dtype)
        stats = []
        for block in self.layers:
            run = type(block).__call__
            if c.remat != "none":
                run = jax.checkpoint(run, policy=_REMAT[c.remat])
            x, s = run(block, x, segment_ids, positions, token_mask)
            if s is not None:
                stats.append(s)
        return DecoderOutput(logits=self._logits(x), router_stats=tuple(stats))

    def _logits(self, x):
        c = self.config
        x = self.norm(x)
        head = self.embed_tokens[...].T if c.tie_word_embeddings else self.lm_head[...]
        return jnp.einsum("btd,dv->btv", x, head.astype(c.compute_dtype), preferred_element_type=jnp.float32)

    def prefill(self, tokens: jax.Array, prompt_lengths: jax.Array, max_len: int,
                cache_dtype=jnp.bfloat16, *, last_only: bool = False,
                segment: int | None = PREFILL_SEGMENT) -> tuple[jax.Array, Cache]:
        """Run left-padded prompts and build the inference cache.

        tokens ``[B, T]``: row b holds its prompt in the last ``prompt_lengths[b]`` slots (padding
        before it is ignored: it is a separate document). Returns the logits ``[B, T, vocab]``
        (the next token of row b comes from position T − 1; logits at padding positions are
        meaningless) and a ``Cache`` of ``max_len`` slots whose next write position is T.
        ``last_only``: logits ``[B, 1, vocab]`` of position T − 1 only — what generation needs; the
        full float32 logits are ``T × vocab × 4`` bytes per row (80 GiB at 128K tokens and a 160K
        vocabulary), and XLA does not move a later ``[:, -1]`` slice in front of the head matmul.
        Memory is linear in T (MLA prefill runs ``prefill_attention``), and with ``segment`` the
        KDA layers and FFNs hold the temporaries of ``segment`` tokens only (``Block.prefill``);
        ``None`` runs every layer over the whole prompt at once (same result).
        """
        B, T = tokens.shape
        if prompt_lengths.shape != (B,):
            raise ValueError(f"prompt_lengths must have shape {(B,)}, got {prompt_lengths.shape}")
        start = (T - prompt_lengths).astype(jnp.int32)
        segment_ids = (jnp.arange(T)[None, :] >= start[:, None]).astype(jnp.int32)
        positions = document_positions(segment_ids)
        x = jnp.take(self.embed_tokens[...], tokens, axis=0).astype(self.config.compute_dtype)
        caches = []
        for block in self.layers:
            x, c = block.prefill(x, segment_ids, positions, max_len, cache_dtype, segment)
            caches.append(c)
        logits = self._logits(x[:, -1:] if last_only else x)
        return logits, Cache(layers=tuple(caches), start=start, pos=jnp.asarray(T, jnp.int32))

    def decode(self, tokens: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """S new tokens ``[B, S]`` per row after the cached ones → (logits ``[B, S, vocab]``, cache)."""
        B, S = tokens.shape
        if cache.start.shape != (B,):
            raise ValueError(f"tokens have batch {B}, the cache {cache.start.shape[0]}")
        positions = cache.pos + jnp.arange(S)[None, :] - cache.start[:, None]
        x = jnp.take(self.embed_tokens[...], tokens, axis=0).astype(self.config.compute_dtype)
        caches = []
        for block, c in zip(self.layers, cache.layers):
            x, c = block.decode(x, c, cache.start, cache.pos, positions)
            caches.append(c)
        return self._logits(x), Cache(layers=tuple(caches), start=cache.start, pos=cache.pos + S)

    def update_router_biases(self, loads, rate: float) -> None:
        """Aux-loss-free balancing: nudge each MoE layer's correction bias by the sign of its load error.

        ``loads``: one ``[num_experts]`` load per MoE layer (``s.load for s in
        DecoderOutput.router_stats``, averaged over micro-batches); call outside the gradient, once
        per optimiser step.
        """
        moe_layers = [b.block_sparse_moe for b in self.layers if b.is_moe]
        if len(moe_layers) != len(loads):
            raise ValueError(f"got router loads for {len(loads)} MoE layers, the model has {len(moe_layers)}")
        for moe, load in zip(moe_layers, loads):
            moe.update_bias(load, rate)


def document_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of each token inside its document: 0 where the segment id changes, then +1."""
    T = segment_ids.shape[1]
    idx = jnp.arange(T)
    start = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    last_start = jax.lax.cummax(jnp.where(start, idx, 0), axis=1)
    return idx - last_start
