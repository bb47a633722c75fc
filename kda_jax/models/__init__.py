"""Model configs, presets and the Kimi Linear hybrid decoder."""

from kda_jax.models.config import ModelConfig, hybrid_layout
from kda_jax.models.decoder import DecoderOutput, HybridDecoder, document_positions
from kda_jax.models.params import count_params
from kda_jax.models.presets import PRESETS, VARIANTS, config_names, get_config, variant

__all__ = ["ModelConfig", "hybrid_layout", "HybridDecoder", "DecoderOutput", "document_positions", "count_params",
           "PRESETS", "VARIANTS", "config_names", "get_config", "variant"]
