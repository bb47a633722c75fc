"""Hugging Face Kimi-Linear checkpoint import and export."""

from kda_jax.convert.hf import config_from_hf, config_to_hf, load_hf_checkpoint, save_hf_checkpoint

__all__ = ["config_from_hf", "config_to_hf", "load_hf_checkpoint", "save_hf_checkpoint"]
