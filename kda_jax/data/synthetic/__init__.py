"""Synthetic tasks of the Kimi Linear paper (§5.1): palindrome, MQAR and stack, as grain pipelines.

    from kda_jax.data.synthetic import (SyntheticConfig, synthetic_iterator, synthetic_eval_batches,
                                        answer_metrics, summarize)

    cfg = SyntheticConfig(task="mqar", seq_len=1024, batch_size=64)
    # the model's vocab_size must be >= cfg.model_vocab_size
    it = synthetic_iterator(cfg)             # infinite local batches, fresh examples every step
    batch = next(it)                         # tokens, targets, loss_mask, segment_ids, positions: [B, T]
    evals = synthetic_eval_batches(cfg, 8)   # fixed held-out batches (eval_seed)
    sums = answer_metrics(jnp.argmax(logits, -1), batch)   # accumulate, then summarize(sums)

The batches have the text pipeline's keys and dtypes (``kda_jax.data.packing``); ``loss_mask``
is 1 only at the answers. Token formats: ``tasks``; sizes and ids: ``config``.
"""

from kda_jax.data.synthetic.config import NUM_SPECIAL, PAD, POP, PUSH, SEP, TASKS, SyntheticConfig
from kda_jax.data.synthetic.metrics import answer_metrics, summarize
from kda_jax.data.synthetic.pipeline import synthetic_dataset, synthetic_eval_batches, synthetic_iterator
from kda_jax.data.synthetic.tasks import make_example, mqar_example, palindrome_example, stack_example

__all__ = ["NUM_SPECIAL", "PAD", "POP", "PUSH", "SEP", "TASKS", "SyntheticConfig", "answer_metrics",
           "make_example", "mqar_example", "palindrome_example", "stack_example", "summarize",
           "synthetic_dataset", "synthetic_eval_batches", "synthetic_iterator"]
