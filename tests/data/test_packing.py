import grain
import numpy as np
import pytest

from kda_jax.data.packing import PieceSource, cut_pieces, pack, piece_features
from kda_jax.data.text import TokenCorpus
from tests.data.helpers import check_batch, row_pieces


@pytest.mark.parametrize("seq_len", [2, 3, 16])
def test_cut_pieces_cover_every_next_token_pair_once(seq_len):
    rng = np.random.default_rng(seq_len)
    lengths = rng.integers(0, 5 * seq_len, 40)
    spans = np.stack([np.arange(40), rng.integers(0, 3, 40), lengths + 3], axis=1)
    pieces = cut_pieces(spans, seq_len)
    for doc, start, stop in spans:
        mine = pieces[pieces[:, 0] == doc]
        if stop - start < 2:
            assert len(mine) == 0
            continue
        lens = mine[:, 2] - mine[:, 1]
        assert (lens >= 2).all() and (lens[:-1] == seq_len).all() and lens[-1] <= seq_len
        assert mine[0, 1] == start and mine[-1, 2] == stop
        assert (mine[1:, 1] == mine[:-1, 2] - 1).all()  # one shared token: no pair lost or repeated
        assert (lens - 1).sum() == stop - start - 1


def test_piece_features():
    f = piece_features(np.array([5, 6, 7]))
    assert f["tokens"].tolist() == [5, 6, 7] and f["targets"].tolist() == [6, 7, 0]
    assert f["loss_mask"].tolist() == [1, 1, 0]
    assert f["tokens"].dtype == np.int32 and f["loss_mask"].dtype == np.float32


@pytest.mark.parametrize("seq_len,rows", [(8, 1), (16, 4), (33, 3)])
def test_packed_rows_hold_exactly_the_pieces(seq_len, rows):
    # Token values are their position in the corpus, so a piece is named by its first token.
    rng = np.random.default_rng(rows)
    lengths = rng.integers(1, 4 * seq_len, 60)
    corpus = TokenCorpus(np.arange(lengths.sum(), dtype=np.int32), lengths)
    spans = np.stack([np.arange(60), np.zeros(60, np.int64), lengths], axis=1)
    pieces = cut_pieces(spans, seq_len)
    stream = grain.MapDataset.source(PieceSource(corpus, pieces)).to_iter_dataset()
    packed = list(pack(stream, seq_len, rows))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    expected = {int(offsets[d] + a): np.arange(offsets[d] + a, offsets[d] + b) for d, a, b in pieces}
    order = {first: i for i, first in enumerate(expected)}
    seen = []
    for row in packed:
        check_batch({k: v[None] for k, v in row.items()}, 1, seq_len)
        got = row_pieces(row)
        assert [order[int(p[0])] for p in got] == sorted(order[int(p[0])] for p in got)  # stream order
        for p in got:
            np.testing.assert_array_equal(p, expected[int(p[0])])
        seen += [int(p[0]) for p in got]
    assert sorted(seen) == sorted(expected)
    # First fit: each group of `rows` rows holds a run of consecutive pieces of the stream.
    for g in range(0, len(packed) - rows + 1, rows):
        ids = sorted(order[int(p[0])] for row in packed[g:g + rows] for p in row_pieces(row))
        assert ids == list(range(ids[0], ids[0] + len(ids)))
