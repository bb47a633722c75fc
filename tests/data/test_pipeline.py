import dataclasses
import json

import grain
import numpy as np
import pytest

from kda_jax.data import (DataConfig, eval_batches, load_corpus, split_documents, train_dataset,
                          train_iterator, train_pieces)
from kda_jax.data.pipeline import _pieces
from tests.data.helpers import assert_same, batch_pieces, check_batch, doc_of, tagged_docs, take, write_docs

SEQ, ROWS = 16, 4


@pytest.fixture
def cfg(tmp_path):
    """20 documents of 10-50 bytes (about one epoch per 8 batches), 4 held out."""
    write_docs(tmp_path / "corpus", tagged_docs(20, min_len=10, max_len=50))
    return DataConfig(path=str(tmp_path / "corpus"), seq_len=SEQ, batch_size=ROWS, val_fraction=0.2)


def split_docs(cfg):
    train, val = split_documents(load_corpus(cfg).doc_lengths, cfg.val_fraction, cfg.split_seed)
    return set(train[:, 0].tolist()), set(val[:, 0].tolist())


def test_train_batches_hold_only_training_documents(cfg):
    train_docs, val_docs = split_docs(cfg)
    assert len(val_docs) == 4 and not train_docs & val_docs and len(train_docs | val_docs) == 20
    seen = set()
    for batch in take(train_iterator(cfg, process_index=0, process_count=1), 30):
        check_batch(batch, ROWS, SEQ)
        seen |= {doc_of(p) for p in batch_pieces(batch)}
    assert seen == train_docs


def test_same_seed_same_batches_other_seed_differs(cfg):
    a = take(train_iterator(cfg, process_index=0, process_count=1), 6)
    assert_same(a, take(train_iterator(cfg, process_index=0, process_count=1), 6))
    c = take(train_iterator(dataclasses.replace(cfg, seed=1), process_index=0, process_count=1), 6)
    assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))


def test_each_epoch_is_reshuffled(cfg):
    n = len(_pieces(cfg)[1])
    stream = train_pieces(cfg, process_index=0, process_count=1)
    epochs = [[tuple(stream[i]["tokens"].tolist()) for i in range(e * n, (e + 1) * n)] for e in range(3)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(epochs[2])
    assert epochs[0] != epochs[1] != epochs[2]


@pytest.mark.parametrize("before,after", [(5, 3), (11, 9)])  # the second crosses epoch boundaries
def test_exact_resume(cfg, before, after):
    it = train_iterator(cfg, process_index=0, process_count=1)
    take(it, before)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, after)
    fresh = train_iterator(cfg, process_index=0, process_count=1)
    fresh.set_state(state)
    assert_same(take(fresh, after), expected)


def test_orbax_checkpoint_resume(cfg, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    it = train_iterator(cfg, process_index=0, process_count=1)
    take(it, 4)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = take(it, 3)
    fresh = train_iterator(cfg, process_index=0, process_count=1)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert_same(take(fresh, 3), expected)


def test_processes_read_disjoint_slices_of_one_order(cfg):
    one = train_pieces(cfg, process_index=0, process_count=1)
    two = [train_pieces(cfg, process_index=p, process_count=2) for p in range(2)]
    for i in range(40):  # the global piece order, dealt round-robin to the processes
        np.testing.assert_array_equal(two[i % 2][i // 2]["tokens"], one[i]["tokens"])
    local = [take(train_iterator(cfg, process_index=p, process_count=2), 3) for p in range(2)]
    for batches in local:
        for b in batches:
            check_batch(b, ROWS // 2, SEQ)
    firsts = [{tuple(p.tolist()) for b in batches for p in batch_pieces(b) if len(p) == SEQ}
              for batches in local]
    assert firsts[0] and firsts[1] and not firsts[0] & firsts[1]


def test_process_errors(cfg):
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        train_dataset(cfg, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="process_index"):
        train_dataset(cfg, process_index=2, process_count=2)


def test_eval_batches(cfg):
    _, val_docs = split_docs(cfg)
    corpus = load_corpus(cfg)
    batches = eval_batches(cfg)
    assert_same(batches, eval_batches(cfg))
    pieces = [p for b in batches for p in batch_pieces(b)]
    for b in batches:
        check_batch(b, ROWS, SEQ)
    # Every held-out document, and nothing else, with each next-token pair once.
    targets = {d: 0 for d in val_docs}
    for p in pieces:
        targets[doc_of(p)] += len(p) - 1
    assert targets == {d: int(corpus.doc_lengths[d]) - 1 for d in val_docs}
    assert sum(b["loss_mask"].sum() for b in batches) == sum(targets.values())
    halves = [eval_batches(cfg, process_index=p, process_count=2) for p in range(2)]
    assert_same([{k: np.concatenate([h0[k], h1[k]]) for k in h0} for h0, h1 in zip(*halves)], batches)
    assert_same(eval_batches(cfg, max_batches=1), batches[:1])
    assert eval_batches(dataclasses.replace(cfg, val_fraction=0.0)) == []


def test_split_by_document_hash():
    lengths = np.arange(100) + 5
    train, val = split_documents(lengths, 0.1, split_seed=3)
    assert len(val) == 10 and len(train) == 90
    assert sorted(train[:, 0].tolist() + val[:, 0].tolist()) == list(range(100))
    np.testing.assert_array_equal(val[:, 2], lengths[val[:, 0]])
    np.testing.assert_array_equal(split_documents(lengths, 0.1, split_seed=3)[1], val)
    assert not np.array_equal(split_documents(lengths, 0.1, split_seed=4)[1], val)
    assert len(split_documents(lengths[:3], 0.01, 0)[1]) == 1  # at least one ...
    assert len(split_documents(lengths[:3], 0.9, 0)[0]) == 1   # ... but never every document


def test_single_document_holds_out_its_end(tmp_path):
    write_docs(tmp_path / "one", ["abcdefghij" * 20])
    cfg = DataConfig(path=str(tmp_path / "one"), seq_len=8, batch_size=2, val_fraction=0.1)
    train, val = split_documents(load_corpus(cfg).doc_lengths, 0.1, 0)
    assert train.tolist() == [[0, 0, 180]] and val.tolist() == [[0, 180, 200]]
    held_out = "".join(bytes((p[1:] if i else p).tolist()).decode() for i, p in
                       enumerate(p for b in eval_batches(cfg) for p in batch_pieces(b)))
    assert held_out == ("abcdefghij" * 20)[180:]


def test_missing_path_and_untrainable_corpus(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train_iterator(DataConfig(path=str(tmp_path / "nowhere")), process_index=0, process_count=1)
    write_docs(tmp_path / "tiny", ["a", "b"])
    with pytest.raises(ValueError, match="shorter than two tokens"):
        train_dataset(DataConfig(path=str(tmp_path / "tiny")), process_index=0, process_count=1)


def test_worker_processes_resume_exactly(cfg):
    cfg = dataclasses.replace(cfg, num_workers=2)
    it = train_iterator(cfg, process_index=0, process_count=1)
    first = [{k: np.array(v) for k, v in b.items()} for b in take(it, 4)]
    state = it.get_state()
    expected = [{k: np.array(v) for k, v in b.items()} for b in take(it, 3)]
    it.close()
    fresh = train_iterator(cfg, process_index=0, process_count=1)
    assert_same([{k: np.array(v) for k, v in b.items()} for b in take(fresh, 4)], first)
    fresh.set_state(state)
    assert_same([{k: np.array(v) for k, v in b.items()} for b in take(fresh, 3)], expected)
    fresh.close()
