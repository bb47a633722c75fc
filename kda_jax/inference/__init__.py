"""Inference: caches, prefill and decode of the hybrid model, sampling and generation."""

from kda_jax.inference.cache import Cache, KDACache, MLACache, cache_bytes, tree_bytes

__all__ = ["Cache", "KDACache", "MLACache", "cache_bytes", "tree_bytes"]
