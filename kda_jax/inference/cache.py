"""Inference caches of the hybrid model and their byte accounting (kimi_linear_model §2.3–§3).

Per layer: a KDA (or GDN) layer keeps its float32 recurrent state ``[B, H, K, V]`` and the last
``W − 1`` inputs of each of its three short convolutions ``[B, W − 1, H·K]`` — constant in the
context length; an MLA layer keeps, per token, the normalised compressed latent (``kv_lora_rank``
= 512) and the shared RoPE/NoPE key part (``qk_rope_head_dim`` = 64), preallocated to a maximum
length. ``Cache`` adds each row's first valid slot (prompts are left-padded) and the next write
position, the same for every row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KDACache:
    state: jax.Array          # [B, H, K, V] float32
    conv: tuple = ()          # (q, k, v) conv inputs [B, W-1, H*K], () without short convs


@struct.dataclass
class MLACache:
    latent: jax.Array         # [B, max_len, kv_lora_rank]
    k_pe: jax.Array           # [B, max_len, qk_rope_head_dim]


@struct.dataclass
class Cache:
    layers: tuple             # one KDACache or MLACache per layer
    start: jax.Array          # [B] int32: the first slot of each row's prompt
    pos: jax.Array            # () int32: where the next token is written

    @property
    def max_len(self) -> int:
        return next((c.latent.shape[1] for c in self.layers if isinstance(c, MLACache)), 0)


SLOT_MULTIPLE = 1024


def cache_slots(tokens: int) -> int:
    """Slots to allocate for a cache that must hold ``tokens`` tokens: rounded up to a multiple of
    ``SLOT_MULTIPLE``. XLA's GPU split-K GEMM for the decode step's softmax·latent product pads its
    contraction (the slots) to a multiple of split·8 — 1024 at 128K slots on an H100 — and so writes
    a padded copy of the whole latent cache in every MLA layer at every step otherwise (one 653M
    layer at 131,084 slots: 0.09 ms, as long as the product itself; 143.7 MB of temporaries against
    16.8 MB at 131,072 slots)."""
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    return -(-tokens // SLOT_MULTIPLE) * SLOT_MULTIPLE


def cache_bytes(config, seq_len: int, batch: int, cache_dtype=jnp.bfloat16, conv_dtype=None) -> dict[str, int]:
    """Bytes of the inference cache for ``batch`` sequences of ``seq_len`` tokens.

    ``kda_state``: float32 states of the KDA/GDN layers; ``conv``: their short-conv inputs
    (``conv_dtype``, default the model's compute dtype); ``mla_latent``: latent + shared key part
    per token of the MLA layers (``cache_dtype``); ``total``. Call it on the ``mla_only`` twin
    (``kda_jax.models.variant``) for the comparison.
    """
    if seq_len < 0 or batch < 0:
        raise ValueError(f"seq_len and batch must be >= 0, got {seq_len}, {batch}")
    n_kda = sum(config.is_kda_layer(i) for i in range(config.num_hidden_layers))
    n_mla = config.num_hidden_layers - n_kda
    H, D, W = config.kda_num_heads, config.kda_head_dim, config.short_conv_kernel_size
    conv_item = jnp.dtype(conv_dtype or config.compute_dtype).itemsize
    out = {
        "kda_state": n_kda * batch * H * D * D * 4,
        "conv": n_kda * batch * 3 * max(W - 1, 0) * H * D * conv_item,
        "mla_latent": n_mla * batch * seq_len * (config.kv_lora_rank + config.qk_rope_head_dim)
                      * jnp.dtype(cache_dtype).itemsize,
    }
    out["total"] = sum(out.values())
    return out


def empty_cache(config, batch: int, max_len: int, *, pos: int = 0, cache_dtype=jnp.bfloat16) -> Cache:
    """A zero cache as ``HybridDecoder.prefill`` would leave it (every row's prompt from slot 0,
    next write at ``pos``): for benchmarks that need a long context without running its prefill."""
    layers = []
    width = config.kda_num_heads * config.kda_head_dim
    P = max(config.short_conv_kernel_size - 1, 0)
    for i in range(config.num_hidden_layers):
        if config.is_kda_layer(i):
            conv = tuple(jnp.zeros((batch, P, width), config.compute_dtype) for _ in range(3)) if P else ()
            D = config.kda_head_dim
            layers.append(KDACache(state=jnp.zeros((batch, config.kda_num_heads, D, D), jnp.float32), conv=conv))
        else:
            layers.append(MLACache(latent=jnp.zeros((batch, max_len, config.kv_lora_rank), cache_dtype),
                                   k_pe=jnp.zeros((batch, max_len, config.qk_rope_head_dim), cache_dtype)))
    return Cache(layers=tuple(layers), start=jnp.zeros((batch,), jnp.int32), pos=jnp.asarray(pos, jnp.int32))


def cache_shardings(cache: Cache, mesh, rules=None) -> Cache:
    """NamedShardings for ``cache`` that follow the model's rules (``kda_jax.models.sharding``):
    rows over the batch axes, KDA heads and conv channels over ``heads``; the latent rows are split
    by row only (they are one KV head shared by every query head)."""
    from jax.sharding import NamedSharding

    from kda_jax.models.sharding import _fit, logical_to_mesh

    def named(x, axes):
        return NamedSharding(mesh, _fit(logical_to_mesh(axes, rules), x.shape, mesh))

    layers = []
    for c in cache.layers:
        if isinstance(c, KDACache):
            layers.append(KDACache(state=named(c.state, ("batch", "heads", None, None)),
                                   conv=tuple(named(x, ("batch", None, "heads")) for x in c.conv)))
        else:
            layers.append(MLACache(latent=named(c.latent, ("batch", "length", "kv_lora")),
                                   k_pe=named(c.k_pe, ("batch", "length", None))))
    return Cache(layers=tuple(layers), start=named(cache.start, ("batch",)), pos=named(cache.pos, ()))


def tree_bytes(tree) -> int:
    """Bytes of every array in a pytree (an independent count for ``cache_bytes``)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))
