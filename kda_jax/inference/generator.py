"""Batched generation with caches: one jitted prefill, one jitted decode step with the cache donated."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kda_jax.inference.cache import cache_shardings
from kda_jax.inference.sampling import Sampling, sample


def _bucket(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Generator:
    """Generate from a ``HybridDecoder`` for batches of prompts of different lengths.

    Prompts are left-padded to a multiple of ``pad_multiple`` (so few prompt lengths compile),
    the cache holds ``max_len`` slots; decoding compiles once and updates the cache in place. With
    ``mesh`` (a model created sharded on it) the cache is sharded by ``cache_shardings``.
    """

    def __init__(self, model, *, max_len: int, sampling: Sampling = Sampling(), cache_dtype=jnp.bfloat16,
                 pad_multiple: int = 64, mesh=None):
        self.model, self.max_len, self.sampling, self.pad_multiple = model, max_len, sampling, pad_multiple

        def prefill(m, tokens, lengths, key):
            logits, cache = m.prefill(tokens, lengths, max_len, cache_dtype)
            if mesh is not None:  # a sharded model: shard the cache the same way (``cache_shardings``)
                cache = jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh))
            return sample(logits[:, -1], key, sampling), cache

        def step(m, tokens, cache, key):
            logits, cache = m.decode(tokens[:, None], cache)
            return sample(logits[:, 0], key, sampling), cache

        self._prefill = nnx.jit(prefill)
        self._step = nnx.jit(step, donate_argnums=2)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, seed: int = 0,
                 stop_tokens: Sequence[int] = (), on_token: Callable[[int, np.ndarray], None] | None = None,
                 ) -> list[list[int]]:
        """New token ids per prompt (up to and including a stop token). ``on_token(i, ids)`` is
        called with each step's ids ``[B]`` as they come (streaming)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("give at least one prompt, each with at least one token")
        T = _bucket(max(len(p) for p in prompts), self.pad_multiple)
        if T + max_new_tokens > self.max_len:
            raise ValueError(f"prompts padded to {T} tokens + {max_new_tokens} new tokens exceed the cache "
                             f"of {self.max_len}; raise max_len")
        tokens = np.zeros((len(prompts), T), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, T - len(p):] = p
        key = jax.random.key(seed)
        stop = np.asarray(list(stop_tokens), np.int32)
        out = [[] for _ in prompts]
        done = np.zeros(len(prompts), bool)
        key, sub = jax.random.split(key)
        nxt, cache = self._prefill(self.model, jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts]), sub)
        for i in range(max_new_tokens):
            ids = np.asarray(nxt)
            if on_token is not None:
                on_token(i, ids)
            for b in np.flatnonzero(~done):
                out[b].append(int(ids[b]))
            done |= np.isin(ids, stop)
            if done.all() or i == max_new_tokens - 1:
                break
            key, sub = jax.random.split(key)
            nxt, cache = self._step(self.model, nxt, cache, sub)
        return out
