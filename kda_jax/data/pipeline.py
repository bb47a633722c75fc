"""grain pipelines: the infinite, shuffled, per-process training stream and the fixed validation batches.

Training (`train_dataset`): the pieces of the training documents (`packing.cut_pieces`) ->
`MapDataset` shuffled with a seed derived from `DataConfig.seed`, reshuffled every epoch
(grain folds the epoch into the seed) -> repeated forever -> this process's slice
`[process_index::process_count]` of that global piece order -> first-fit packed into groups
of batch_size / process_count rows -> batched. The processes read disjoint pieces and each
emits its local batch; the global batch is their concatenation in process order. The
iterator's state (`get_state` / `set_state`, orbax `grain.checkpoint.CheckpointSave`) is the
piece index plus the packing position, so a restored iterator yields exactly the batches the
uninterrupted one would have. The stream depends on seed, seq_len, batch_size,
process_count and num_workers (each grain worker packs its own slice of the pieces), and is
fixed for each choice. Close the iterator (`it.close()`) when num_workers > 0.

Validation (`eval_batches`): the validation pieces in corpus order, packed into global
batches (the last one padded with empty rows), each process taking its rows.

The split (`split_documents`) is by document: a fixed hash of (split_seed, document index)
ranks the documents and the round(val_fraction * n) lowest are held out (at least one, never
all). A one-document corpus holds out its last round(val_fraction * n_tokens) tokens instead.
"""

from __future__ import annotations

import grain
import jax
import numpy as np
from absl import flags

from kda_jax.data import packing, text
from kda_jax.data.config import DataConfig
from kda_jax.data.tokenizers import Tokenizer, make_tokenizer

Batch = dict[str, np.ndarray]
# Read-ahead of the piece reader: pieces are small slices, so two threads keep packing fed.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=256)


def tokenizer_for(cfg: DataConfig) -> Tokenizer:
    return make_tokenizer(cfg.tokenizer)


def load_corpus(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> packing.Corpus:
    """The tokenised documents at cfg.path: a shard directory, or text tokenised into memory."""
    # Imported here so that `python -m kda_jax.data.array_record` runs a module not yet imported.
    from kda_jax.data import array_record

    tokenizer = tokenizer or tokenizer_for(cfg)
    if array_record.is_shard_dir(cfg.path):
        corpus = array_record.ArrayRecordCorpus(cfg.path)
        corpus.check(tokenizer, cfg.doc_split)
        return corpus
    return text.load_text_corpus(cfg.path, cfg.doc_split, tokenizer)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fixed, platform-independent bijective hash of uint64 values."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):  # multiplication modulo 2**64 is the point
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def split_documents(doc_lengths: np.ndarray, val_fraction: float,
                    split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train spans, validation spans), each int64 `[N, 3]` of (doc, start, stop), in doc order."""
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    n = len(lengths)
    spans = np.stack([np.arange(n), np.zeros(n, np.int64), lengths], axis=1)
    if val_fraction == 0 or n == 0 or (n == 1 and lengths[0] < 2):
        return spans, spans[:0]
    if n == 1:
        n_val = min(max(round(val_fraction * lengths[0]), 1), lengths[0] - 1)
        cut = lengths[0] - n_val
        return np.array([[0, 0, cut]]), np.array([[0, cut, lengths[0]]])
    n_val = min(max(round(val_fraction * n), 1), n - 1)
    keys = _mix64(np.arange(n, dtype=np.uint64) ^ _mix64(np.uint64(split_seed)))
    is_val = np.zeros(n, bool)
    is_val[np.argsort(keys, kind="stable")[:n_val]] = True
    return spans[~is_val], spans[is_val]


def _pieces(cfg: DataConfig) -> tuple[packing.Corpus, np.ndarray, np.ndarray]:
    corpus = load_corpus(cfg)
    train, val = split_documents(corpus.doc_lengths, cfg.val_fraction, cfg.split_seed)
    return corpus, packing.cut_pieces(train, cfg.seq_len), packing.cut_pieces(val, cfg.seq_len)


def process_rows(cfg, process_index: int | None, process_count: int | None) -> tuple[int, int, int]:
    """(process_index, process_count, local batch rows) of ``cfg.batch_size`` global rows (a
    ``DataConfig`` or a ``SyntheticConfig``), defaulting to this JAX process."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index must be in [0, process_count={count}), got {index}")
    if cfg.batch_size % count:
        raise ValueError(f"{type(cfg).__name__}.batch_size={cfg.batch_size} (global rows) is not divisible by "
                         f"process_count={count}")
    return index, count, cfg.batch_size // count


def with_workers(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
    """``ds`` produced by ``num_workers`` grain worker processes (``mp_prefetch``; 0: as is). The
    workers take the batches round-robin, so the stream is the one without workers."""
    if num_workers <= 0:
        return ds
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (jax_stack_notes §7.1)
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))


def train_pieces(cfg: DataConfig, *, process_index: int | None = None,
                 process_count: int | None = None) -> grain.MapDataset:
    """This process's infinite, shuffled stream of piece features, before packing."""
    index, count, _ = process_rows(cfg, process_index, process_count)
    corpus, train, _ = _pieces(cfg)
    if len(train) == 0:
        raise ValueError(f"no training text at {cfg.path!r}: every training document is shorter "
                         "than two tokens")
    # Mixed so that nearby seeds do not give epoch-shifted copies of one order (grain adds
    # the epoch to the seed).
    seed = int(_mix64(np.uint64(cfg.seed)) % np.uint64(2**32))
    ds = grain.MapDataset.source(packing.PieceSource(corpus, train)).shuffle(seed=seed).repeat(None)
    return ds[index::count]


def train_dataset(cfg: DataConfig, *, process_index: int | None = None,
                  process_count: int | None = None) -> grain.IterDataset:
    """Infinite local batches (dicts of `[batch_size / process_count, seq_len]`, see `packing`)."""
    _, _, rows = process_rows(cfg, process_index, process_count)
    pieces = train_pieces(cfg, process_index=process_index, process_count=process_count)
    ds = packing.pack(pieces.to_iter_dataset(_READ_OPTIONS), cfg.seq_len, rows)
    return with_workers(ds.batch(rows, drop_remainder=True), cfg.num_workers)


def train_iterator(cfg: DataConfig, *, process_index: int | None = None,
                   process_count: int | None = None) -> grain.DatasetIterator:
    """`iter(train_dataset(...))`: checkpointable with get_state/set_state or orbax."""
    return iter(train_dataset(cfg, process_index=process_index, process_count=process_count))


def eval_batches(cfg: DataConfig, max_batches: int | None = None, *, process_index: int | None = None,
                 process_count: int | None = None) -> list[Batch]:
    """The validation batches, the same on every call: this process's rows of each global batch."""
    if max_batches is not None and max_batches < 0:
        raise ValueError(f"max_batches must be None or >= 0, got {max_batches}")
    index, _, rows = process_rows(cfg, process_index, process_count)
    corpus, _, val = _pieces(cfg)
    if len(val) == 0 or max_batches == 0:
        return []
    ds = grain.MapDataset.source(packing.PieceSource(corpus, val)).to_iter_dataset(_READ_OPTIONS)
    ds = packing.pack(ds, cfg.seq_len, cfg.batch_size).batch(cfg.batch_size, drop_remainder=False)
    batches = []
    for batch in ds:
        pad = ((0, cfg.batch_size - len(batch["tokens"])), (0, 0))
        batches.append({k: np.pad(v, pad)[index * rows:(index + 1) * rows] for k, v in batch.items()})
        if len(batches) == max_batches:
            break
    return batches
