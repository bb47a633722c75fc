"""Answer accuracy of a synthetic task, as sums that accumulate over batches (jit-friendly).

``answer_metrics(predictions, batch)`` compares the predicted ids (argmax of the logits at
each position, `[B, T]`) with ``batch["targets"]`` where ``batch["loss_mask"]`` is set:

  correct     supervised positions predicted right
  supervised  supervised positions
  exact       rows (one example each) with at least one supervised position, all right
  examples    rows with at least one supervised position

Sum the dicts of several batches (``jax.tree.map(jnp.add, a, b)``) and ``summarize`` the total:
token_accuracy = correct / supervised, exact_match = exact / examples (0 where nothing is
supervised).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp


def answer_metrics(predictions: jax.Array, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """int32 sums {correct, supervised, exact, examples} for predictions `[B, T]` of `batch`."""
    mask_BxT = jnp.asarray(batch["loss_mask"]) > 0
    right_BxT = jnp.asarray(predictions) == jnp.asarray(batch["targets"])
    has_answer_B = jnp.any(mask_BxT, axis=-1)
    all_right_B = jnp.all(right_BxT | ~mask_BxT, axis=-1)
    count = lambda x: jnp.sum(x, dtype=jnp.int32)
    return {"correct": count(right_BxT & mask_BxT), "supervised": count(mask_BxT),
            "exact": count(all_right_B & has_answer_B), "examples": count(has_answer_B)}


def summarize(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """{token_accuracy, exact_match} (float32) from (accumulated) `answer_metrics` sums."""
    def ratio(num: str, den: str) -> jax.Array:
        return jnp.asarray(sums[num], jnp.float32) / jnp.maximum(jnp.asarray(sums[den], jnp.float32), 1.0)

    return {"token_accuracy": ratio("correct", "supervised"), "exact_match": ratio("exact", "examples")}
