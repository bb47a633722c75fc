"""Tiny corpora written to temporary directories, and an independent check of the batch format."""

from __future__ import annotations

import pathlib

import numpy as np

from kda_jax.data import BATCH_KEYS

DTYPES = {"tokens": np.int32, "targets": np.int32, "loss_mask": np.float32, "segment_ids": np.int32,
          "positions": np.int32}


def write_docs(directory: pathlib.Path, docs: list[str]) -> pathlib.Path:
    """One file per document, named so that sorted order is document order."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (directory / f"doc_{i:04d}.txt").write_text(doc, encoding="utf-8")
    return directory


def tagged_docs(n: int, seed: int = 0, min_len: int = 20, max_len: int = 120) -> list[str]:
    """Document i is made of the two letters chr(65 + 2i), chr(66 + 2i): any byte names its document."""
    assert 65 + 2 * n <= 127
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice([chr(65 + 2 * i), chr(66 + 2 * i)], rng.integers(min_len, max_len)))
            for i in range(n)]


def doc_of(piece: np.ndarray) -> int:
    return (int(piece[0]) - 65) // 2


def row_pieces(row: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The pieces of one packed row, in row order, read from tokens and segment_ids only."""
    seg = row["segment_ids"]
    return [row["tokens"][seg == s] for s in range(1, int(seg.max(initial=0)) + 1)]


def batch_pieces(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
    rows = len(batch["tokens"])
    return [p for r in range(rows) for p in row_pieces({k: v[r] for k, v in batch.items()})]


def check_batch(batch: dict[str, np.ndarray], rows: int, seq_len: int):
    """Shapes and dtypes, and every field recomputed position by position from the pieces."""
    assert sorted(batch) == sorted(BATCH_KEYS)
    for k, v in batch.items():
        assert v.shape == (rows, seq_len) and v.dtype == DTYPES[k], (k, v.shape, v.dtype)
    for r in range(rows):
        tokens, seg = batch["tokens"][r].tolist(), batch["segment_ids"][r].tolist()
        used = sum(s != 0 for s in seg)
        assert all(s != 0 for s in seg[:used]) and all(s == 0 for s in seg[used:]), "padding not at the end"
        # Segments are contiguous runs numbered 1, 2, 3, ... of at least two tokens.
        runs = [seg[0]] + [b for a, b in zip(seg[:used], seg[1:used]) if b != a] if used else []
        assert runs == list(range(1, len(runs) + 1)), runs
        assert all(seg.count(s) >= 2 for s in runs)
        for t in range(seq_len):
            same_next = t + 1 < seq_len and seg[t] != 0 and seg[t + 1] == seg[t]
            start = t == 0 or seg[t - 1] != seg[t]
            expected_pos = 0 if seg[t] == 0 or start else batch["positions"][r][t - 1] + 1
            assert batch["positions"][r][t] == expected_pos, (r, t)
            assert batch["targets"][r][t] == (tokens[t + 1] if same_next else 0), (r, t)
            assert batch["loss_mask"][r][t] == (1.0 if same_next else 0.0), (r, t)
            if seg[t] == 0:
                assert tokens[t] == 0


def take(it, n):
    """The next n batches of an iterator."""
    return [next(it) for _ in range(n)]


def assert_same(batches_a, batches_b):
    """Two lists of batches (dicts of arrays) are equal, key by key."""
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
