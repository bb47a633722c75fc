"""Flax NNX modules of Kimi Linear; every parameter carries logical axis names."""

from kda_jax.layers.common import Linear, param
from kda_jax.layers.conv import ShortConv
from kda_jax.layers.kda import KDAMixer
from kda_jax.layers.mla import MLAttention, causal_attention
from kda_jax.layers.mlp import SwiGLU
from kda_jax.layers.moe import MoE, MoEStats, RouterBias
from kda_jax.layers.norms import GatedRMSNorm, RMSNorm, rms_norm

__all__ = ["Linear", "param", "ShortConv", "KDAMixer", "MLAttention", "causal_attention", "SwiGLU", "MoE",
           "MoEStats", "RouterBias", "GatedRMSNorm", "RMSNorm", "rms_norm"]
