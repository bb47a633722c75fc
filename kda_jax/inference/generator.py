"""Batched generation with caches: one jitted prefill, one jitted decode step with the cache donated.

The model is split once (``nnx.split``, its state flattened to a list of arrays) and the steps are
``jax.jit`` of pure functions of that list that merge the module inside the trace (``ModelSteps``,
which benchmarks call too). ``nnx.jit`` instead walks, splits and merges the whole module tree in
Python on every call (43 ms per decode step for the 16-layer ``scaling_653m`` tree on a CPU), and a
jitted function of the ``nnx.State`` still flattens it and hashes the graphdef per call (~6 ms).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kda_jax.inference.cache import cache_shardings, cache_slots
from kda_jax.inference.sampling import Sampling, sample


def _bucket(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class ModelSteps:
    """The library's jitted steps of one model, on its parameters as a flat list of arrays.

    ``decode(leaves, tokens [B, S], cache)`` → (logits ``[B, S, vocab]``, cache), the cache donated
    (updated in place); ``prefill(leaves, tokens, prompt_lengths, max_len=, cache_dtype=)`` →
    (last-position logits ``[B, vocab]``, cache). ``leaves`` is ``self.leaves`` (or
    ``leaves_of(model)`` after the parameters changed). The state is flattened once here: a jitted
    function of the ``nnx.State`` would flatten its nested dicts in Python and hash the graphdef on
    every call (4 ms and 2 ms per call for ``scaling_653m`` on a CPU host), which at batch 1 is
    the whole decode step.
    """

    def __init__(self, model):
        graphdef, state = nnx.split(model)
        self.leaves, self._treedef = jax.tree.flatten(state)
        self._graphdef = graphdef
        self.decode = jax.jit(self._decode, donate_argnums=2)
        self.prefill = jax.jit(self._prefill, static_argnames=("max_len", "cache_dtype"))

    def leaves_of(self, model) -> list:
        """``model``'s current parameters and variables in this object's flat order."""
        leaves, treedef = jax.tree.flatten(nnx.state(model))
        if treedef != self._treedef:
            raise ValueError("the model's structure changed since these steps were built; build new ModelSteps")
        return leaves

    def model(self, leaves):
        """The module rebuilt from ``leaves`` (inside a trace)."""
        return nnx.merge(self._graphdef, jax.tree.unflatten(self._treedef, leaves))

    def _decode(self, leaves, tokens, cache):
        return self.model(leaves).decode(tokens, cache)

    def _prefill(self, leaves, tokens, prompt_lengths, *, max_len, cache_dtype=jnp.bfloat16):
        logits, cache = self.model(leaves).prefill(tokens, prompt_lengths, max_len, cache_dtype, last_only=True)
        return logits[:, 0], cache


class Generator:
    """Generate from a ``HybridDecoder`` for batches of prompts of different lengths.

    Prompts are left-padded to a multiple of ``pad_multiple`` (so few prompt lengths compile),
    the cache holds ``max_len`` tokens (``cache_slots(max_len)`` slots); decoding compiles once and
    updates the cache in place. With ``mesh`` (a model created sharded on it) the cache is sharded
    by ``cache_shardings``. Each ``generate`` reads the model's current parameters (flattened once
    per call, not per step).
    """

    def __init__(self, model, *, max_len: int, sampling: Sampling = Sampling(), cache_dtype=jnp.bfloat16,
                 pad_multiple: int = 64, mesh=None):
        self.model, self.max_len, self.sampling, self.pad_multiple = model, max_len, sampling, pad_multiple
        self.steps = steps = ModelSteps(model)

        def prefill(leaves, tokens, lengths, key):  # the library's steps, inlined, with sampling fused
            logits, cache = steps.prefill(leaves, tokens, lengths, max_len=cache_slots(max_len), cache_dtype=cache_dtype)
            if mesh is not None:  # a sharded model: shard the cache the same way (``cache_shardings``)
                cache = jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh))
            return sample(logits, key, sampling), cache

        def step(leaves, tokens, cache, key):
            logits, cache = steps.decode(leaves, tokens[:, None], cache)
            return sample(logits[:, 0], key, sampling), cache

        self._prefill = jax.jit(prefill)
        self._step = jax.jit(step, donate_argnums=2)

    def state(self) -> list:
        """The model's current parameters and variables (flat), for ``_prefill`` / ``_step``."""
        return self.steps.leaves_of(self.model)

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
        state = self.state()
        nxt, cache = self._prefill(state, jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts]), sub)
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
            nxt, cache = self._step(state, nxt, cache, sub)
        return out
