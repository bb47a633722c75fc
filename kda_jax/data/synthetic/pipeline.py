"""grain pipelines of synthetic examples: the infinite training stream and fixed held-out batches.

Example g of a stream is ``make_example(cfg, np.random.default_rng([stream, seed, g]))`` with
stream 0 and ``cfg.seed`` for training, stream 1 and ``cfg.eval_seed`` for evaluation: a pure
function of its index, so no example is ever stored, each step sees fresh ones, and the two
streams never share an example's random numbers (even with equal seeds).

Global batch s holds examples s * batch_size .. (s + 1) * batch_size - 1, one per row, and
process p of P takes the contiguous rows p * R .. (p + 1) * R - 1 (R = batch_size / P). So the
processes read disjoint examples, their local batches concatenated in process order are the
global batch, and the global batches do not depend on P.

Training (``synthetic_dataset``): ``MapDataset.range`` over this process's example slots ->
example index -> example -> batches of R rows -> ``IterDataset``. The iterator's state
(``get_state`` / ``set_state``, orbax ``grain.checkpoint.CheckpointSave``) is the next slot, so
a restored iterator yields exactly the batches the uninterrupted one would have. With
``num_workers > 0`` grain worker processes generate the batches (the same stream); close the
iterator (``it.close()``) when done.
"""

from __future__ import annotations

import sys

import grain
import numpy as np

from kda_jax.data.pipeline import process_rows, with_workers
from kda_jax.data.synthetic.config import SyntheticConfig
from kda_jax.data.synthetic.tasks import make_example

Batch = dict[str, np.ndarray]
TRAIN_STREAM, EVAL_STREAM = 0, 1
# Examples are generated in the prefetch threads; a few keep a small model's step fed.
_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=256)


def example_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([stream, seed, index])


class _Example:
    """Local slot j of process `index` -> example (j // rows) * batch_size + index * rows + j % rows."""

    def __init__(self, cfg: SyntheticConfig, seed: int, stream: int, index: int, rows: int):
        self._cfg, self._seed, self._stream, self._index, self._rows = cfg, seed, stream, index, rows

    def __call__(self, slot: int) -> Batch:
        step, row = divmod(int(slot), self._rows)
        example = step * self._cfg.batch_size + self._index * self._rows + row
        return make_example(self._cfg, example_rng(self._seed, self._stream, example))


def synthetic_dataset(cfg: SyntheticConfig, *, process_index: int | None = None,
                      process_count: int | None = None) -> grain.IterDataset:
    """Infinite local batches (dicts of `[batch_size / process_count, seq_len]`, see `tasks`)."""
    index, _, rows = process_rows(cfg, process_index, process_count)
    ds = grain.MapDataset.range(sys.maxsize).map(_Example(cfg, cfg.seed, TRAIN_STREAM, index, rows))
    return with_workers(ds.batch(rows, drop_remainder=True).to_iter_dataset(_READ_OPTIONS), cfg.num_workers)


def synthetic_iterator(cfg: SyntheticConfig, *, process_index: int | None = None,
                       process_count: int | None = None) -> grain.DatasetIterator:
    """`iter(synthetic_dataset(...))`: checkpointable with get_state/set_state or orbax."""
    return iter(synthetic_dataset(cfg, process_index=process_index, process_count=process_count))


def synthetic_eval_batches(cfg: SyntheticConfig, num_batches: int, *, process_index: int | None = None,
                           process_count: int | None = None) -> list[Batch]:
    """`num_batches` held-out batches from `eval_seed`, the same on every call: this process's rows."""
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 0:
        raise ValueError(f"num_batches must be an integer >= 0, got {num_batches!r}")
    index, _, rows = process_rows(cfg, process_index, process_count)
    example = _Example(cfg, cfg.eval_seed, EVAL_STREAM, index, rows)
    return [{k: np.stack([ex[k] for ex in batch]) for k in batch[0]}
            for batch in ([example(b * rows + r) for r in range(rows)] for b in range(num_batches))]
