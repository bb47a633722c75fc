"""Model configurations shared by tests."""

from kda_jax.models import get_config


def two_layer_config(**overrides):
    """``tiny`` cut to two layers: KDA with the dense FFN, then MLA with the MoE. Every component of the
    hybrid is there, at about half of tiny's XLA compile time (tiny's three KDA layers dominate it)."""
    return get_config("tiny", num_hidden_layers=2, kda_layers=(1,), full_attn_layers=(2,), **overrides)
