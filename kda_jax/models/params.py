"""Parameter counts from shapes alone (``jax.eval_shape``: nothing is allocated)."""

from __future__ import annotations

import math

from flax import nnx

from kda_jax.models.config import ModelConfig


def count_params(config: ModelConfig, *, exclude_embeddings: bool = False) -> tuple[int, int]:
    """(total, activated) parameter counts of ``HybridDecoder(config)``.

    Activated counts what one token uses: every parameter except the routed experts it is not
    sent to (top-k of the routed experts per MoE layer). Router correction biases count as
    parameters, as in the HF checkpoint. ``exclude_embeddings`` drops the input embedding and
    the output head from both numbers (the convention of the paper's scaling table).
    """
    from kda_jax.models.decoder import HybridDecoder
    from kda_jax.models.sharding import abstract_module

    model = abstract_module(lambda: HybridDecoder(config, rngs=nnx.Rngs(0)))
    total = inactive = 0
    for path, var in nnx.to_flat_state(nnx.state(model)):
        n = math.prod(var.get_value().shape)
        if exclude_embeddings and path[-1] in ("embed_tokens", "lm_head"):
            continue
        total += n
        if "block_sparse_moe" in path and path[-1] in ("w1", "w2", "w3"):
            inactive += n * (config.num_experts - config.num_experts_per_token) // config.num_experts
    return total, total - inactive
