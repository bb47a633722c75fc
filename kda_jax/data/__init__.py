"""Data: text and array_record corpora, tokenizers, packing with segment ids, grain pipelines.

    from kda_jax.data import DataConfig, train_iterator, eval_batches, tokenizer_for

    cfg = DataConfig(path="data/shakespeare", seq_len=256, batch_size=16)
    it = train_iterator(cfg)            # infinite local batches; it.get_state() / it.set_state()
    batch = next(it)                    # tokens, targets, loss_mask, segment_ids, positions: [B, T]

`make data` fetches the default corpus (`python -m kda_jax.data.fetch`); `python -m
kda_jax.data.array_record` pre-tokenises a corpus into shards.
"""

from kda_jax.data.config import DataConfig
from kda_jax.data.packing import BATCH_KEYS, cut_pieces, pack
from kda_jax.data.pipeline import (eval_batches, load_corpus, split_documents, tokenizer_for,
                                   train_dataset, train_iterator, train_pieces)
from kda_jax.data.tokenizers import ByteTokenizer, Tokenizer, make_tokenizer

__all__ = ["BATCH_KEYS", "ByteTokenizer", "DataConfig", "Tokenizer", "cut_pieces", "eval_batches",
           "load_corpus", "make_tokenizer", "pack", "split_documents", "tokenizer_for", "train_dataset",
           "train_iterator", "train_pieces"]
