"""Inference: caches, prefill and decode of the hybrid model, sampling and generation."""

from kda_jax.inference.cache import (Cache, KDACache, MLACache, cache_bytes, cache_shardings, cache_slots,
                                     empty_cache, tree_bytes)
from kda_jax.inference.sampling import Sampling, sample


def __getattr__(name):  # Generator imports flax.nnx jit machinery; the layers import this package
    if name in ("Generator", "ModelSteps"):
        from kda_jax.inference import generator

        return getattr(generator, name)
    raise AttributeError(name)


__all__ = ["Cache", "KDACache", "MLACache", "cache_bytes", "cache_shardings", "cache_slots", "empty_cache", "tree_bytes",
           "Sampling", "sample", "Generator", "ModelSteps"]
