"""Cut documents into pieces of at most `seq_len` tokens and pack the pieces into rows.

A span `(doc, start, stop)` of n >= 2 tokens is cut into ceil((n - 1) / (seq_len - 1)) pieces
with stride seq_len - 1, so consecutive pieces share one token and every next-token pair of
the span is supervised exactly once. A piece of L tokens keeps all L tokens in its row and
supervises L - 1 targets (the last token has no next token in its piece). Spans of fewer than
two tokens have nothing to learn and are dropped.

Pieces are packed first-fit (grain's `FirstFitPackIterDataset`, bins in stream order, no
bin shuffle): each piece goes to the first of `rows` open rows with room; when one fits none,
the `rows` rows are emitted and a new group starts with it. A row, every array `[seq_len]`:

  tokens      int32    the piece tokens, 0 in padding
  targets     int32    next token of the same piece, 0 where there is none
  loss_mask   float32  1 where targets is a real next token, else 0 (piece ends, padding)
  segment_ids int32    1, 2, 3, ... per piece within the row, 0 in padding
  positions   int32    position within the piece, 0 in padding
"""

from __future__ import annotations

from typing import Protocol

import grain
import numpy as np

FEATURES = ("tokens", "targets", "loss_mask")
BATCH_KEYS = FEATURES + ("segment_ids", "positions")


class Corpus(Protocol):
    doc_lengths: np.ndarray  # int64 [num_docs]

    def read(self, doc: int, start: int, stop: int) -> np.ndarray: ...


def cut_pieces(spans: np.ndarray, seq_len: int) -> np.ndarray:
    """Spans int64 `[N, 3]` of (doc, start, stop) -> pieces `[P, 3]` in the same order."""
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 3)
    spans = spans[spans[:, 2] - spans[:, 1] >= 2]
    doc, start, stop = spans.T
    count = -(-(stop - start - 1) // (seq_len - 1))
    first = np.cumsum(count) - count
    k = np.arange(count.sum()) - np.repeat(first, count)
    piece_start = np.repeat(start, count) + k * (seq_len - 1)
    piece_stop = np.minimum(piece_start + seq_len, np.repeat(stop, count))
    return np.stack([np.repeat(doc, count), piece_start, piece_stop], axis=1)


def piece_features(tokens: np.ndarray) -> dict[str, np.ndarray]:
    tokens = np.asarray(tokens, dtype=np.int32)
    targets = np.zeros_like(tokens)
    targets[:-1] = tokens[1:]
    loss_mask = np.ones(len(tokens), dtype=np.float32)
    loss_mask[-1] = 0.0
    return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask}


class PieceSource:
    """grain random-access source: element i is the features of piece i of the corpus."""

    def __init__(self, corpus: Corpus, pieces: np.ndarray):
        self._corpus = corpus
        self._pieces = pieces

    def __len__(self) -> int:
        return len(self._pieces)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        doc, start, stop = (int(x) for x in self._pieces[index])
        return piece_features(self._corpus.read(doc, start, stop))


def _to_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    row = {k: packed[k] for k in FEATURES}
    row["segment_ids"] = packed["tokens_segment_ids"]
    row["positions"] = packed["tokens_positions"]
    return row


def pack(pieces: grain.IterDataset, seq_len: int, rows: int) -> grain.IterDataset:
    """Piece features -> packed rows (see the module docstring), in groups of `rows`."""
    packed = grain.experimental.FirstFitPackIterDataset(
        pieces, length_struct={k: seq_len for k in FEATURES}, num_packing_bins=rows,
        shuffle_bins=False)
    return packed.map(_to_row)
