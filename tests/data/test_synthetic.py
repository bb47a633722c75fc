"""Synthetic tasks: every example parsed back and checked against its task's rules, independently.

The layout facts used here (ids 0-3 special, task ids from 4 in the documented ranges, the
example lengths) are restated by hand, not read from the generator.
"""

import dataclasses
import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kda_jax.data import DataConfig, train_iterator
from kda_jax.data.synthetic import (SyntheticConfig, answer_metrics, summarize, synthetic_dataset,
                                    synthetic_eval_batches, synthetic_iterator)
from tests.data.helpers import DTYPES, assert_same, tagged_docs, take, write_docs

PAD, SEP, PUSH, POP, FIRST = 0, 1, 2, 3, 4
ROWS = 8


def local(cfg, process_index=0, process_count=1):
    return synthetic_iterator(cfg, process_index=process_index, process_count=process_count)


def rows_of(batches):
    return [{k: v[r] for k, v in b.items()} for b in batches for r in range(len(b["tokens"]))]


def example_and_answers(row, seq_len):
    """The example's tokens and supervised positions, after checking the row format by hand."""
    for k, v in row.items():
        assert v.shape == (seq_len,) and v.dtype == DTYPES[k], (k, v.shape, v.dtype)
    seg = row["segment_ids"].tolist()
    m = seg.count(1)
    assert m >= 2 and seg == [1] * m + [0] * (seq_len - m)
    assert row["positions"].tolist() == list(range(m)) + [0] * (seq_len - m)
    tokens = row["tokens"].tolist()
    assert all(t != PAD for t in tokens[:m]) and all(t == PAD for t in tokens[m:])
    assert row["targets"].tolist() == tokens[1:m] + [0] * (seq_len - m + 1)
    mask = row["loss_mask"].tolist()
    assert set(mask) <= {0.0, 1.0}
    answers = [t for t in range(seq_len) if mask[t]]
    assert all(t < m - 1 for t in answers), "an answer needs a next token in the example"
    return tokens[:m], answers


def check_palindrome(row, cfg, n):
    ex, answers = example_and_answers(row, cfg.seq_len)
    assert len(ex) == 2 * n + 1 and ex[n] == SEP
    source = ex[:n]
    assert all(FIRST <= x < FIRST + cfg.num_symbols for x in source)
    assert ex[n + 1:] == source[::-1]
    assert answers == list(range(n, 2 * n))
    assert [row["targets"][t] for t in answers] == source[::-1]


def check_mqar(row, cfg, n, q):
    ex, answers = example_and_answers(row, cfg.seq_len)
    assert len(ex) == 2 * n + 1 + 2 * q and ex[2 * n] == SEP
    keys, values = ex[0:2 * n:2], ex[1:2 * n:2]
    assert all(FIRST <= k < FIRST + cfg.num_keys for k in keys) and len(set(keys)) == n
    assert all(FIRST + cfg.num_keys <= v < FIRST + cfg.num_keys + cfg.num_values for v in values)
    value_of = dict(zip(keys, values))
    queried = ex[2 * n + 1::2]
    assert len(set(queried)) == q and set(queried) <= set(keys)
    assert ex[2 * n + 2::2] == [value_of[k] for k in queried]
    assert answers == [2 * n + 1 + 2 * j for j in range(q)]
    assert [row["targets"][t] for t in answers] == [value_of[k] for k in queried]


def check_stack(row, cfg, ops):
    """Replays the operations on Python lists; returns (pops, operations with some stack non-empty)."""
    ex, answers = example_and_answers(row, cfg.seq_len)
    assert len(ex) == 3 * ops
    stacks = {}
    pops, free = [], 0
    for i in range(ops):
        op, s, x = ex[3 * i:3 * i + 3]
        free += any(stacks.values())
        assert FIRST <= s < FIRST + cfg.num_stacks
        assert FIRST + cfg.num_stacks <= x < FIRST + cfg.num_stacks + cfg.num_stack_values
        if op == PUSH:
            stacks.setdefault(s, []).append(x)
        else:
            assert op == POP and stacks.get(s), "pop of an empty stack"
            assert stacks[s].pop() == x
            pops.append(3 * i + 1)
            assert row["targets"][3 * i + 1] == x
    assert answers == pops
    return len(pops), free


@pytest.mark.parametrize("seq_len,palindrome_len,n", [(256, None, 127), (65, None, 32), (100, 10, 10)])
def test_palindrome(seq_len, palindrome_len, n):
    cfg = SyntheticConfig(task="palindrome", seq_len=seq_len, batch_size=ROWS, palindrome_len=palindrome_len)
    for row in rows_of(take(local(cfg), 2)):
        check_palindrome(row, cfg, n)
    assert cfg.model_vocab_size == 4 + 32


@pytest.mark.parametrize("overrides,n,q", [
    ({}, 63, 63),                                         # (256 - 1) // 4 pairs, each queried
    ({"seq_len": 100, "num_queries": 10}, 39, 10),        # (100 - 1 - 20) // 2 pairs
    ({"seq_len": 64, "num_kv_pairs": 8, "num_queries": 3}, 8, 3),
    ({"num_keys": 20, "num_values": 2}, 20, 20),          # capped by the key vocabulary; values repeat
])
def test_mqar(overrides, n, q):
    cfg = SyntheticConfig(task="mqar", batch_size=ROWS, **overrides)
    for row in rows_of(take(local(cfg), 2)):
        check_mqar(row, cfg, n, q)
        assert row["tokens"].max() < cfg.model_vocab_size == 4 + cfg.num_keys + cfg.num_values


@pytest.mark.parametrize("overrides,ops", [({}, 85), ({"seq_len": 100, "num_ops": 30, "num_stacks": 3}, 30)])
def test_stack(overrides, ops):
    cfg = SyntheticConfig(task="stack", batch_size=ROWS, **overrides)
    pops, free = np.sum([check_stack(row, cfg, ops) for row in rows_of(take(local(cfg), 4))], axis=0)
    # a pop with probability 1 - push_prob = 0.4 while some stack is non-empty (±0.06 is > 3 sigma)
    assert abs(pops / free - 0.4) < 0.06
    assert cfg.model_vocab_size == 4 + cfg.num_stacks + 32


def test_keys_and_dtypes_are_the_text_pipelines(tmp_path):
    write_docs(tmp_path / "corpus", tagged_docs(4))
    text = next(train_iterator(DataConfig(path=str(tmp_path / "corpus"), seq_len=16, batch_size=2),
                               process_index=0, process_count=1))
    for task in ("mqar", "palindrome", "stack"):
        batch = next(local(SyntheticConfig(task=task, seq_len=16, batch_size=2)))
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == \
            {k: (v.shape, v.dtype) for k, v in text.items()}


@pytest.mark.parametrize("task", ["mqar", "palindrome", "stack"])
def test_seeds_and_fresh_examples(task):
    cfg = SyntheticConfig(task=task, seq_len=64, batch_size=ROWS)
    a = take(local(cfg), 5)
    assert_same(a, take(local(cfg), 5))
    assert_same(a, take(local(dataclasses.replace(cfg, eval_seed=7)), 5))
    other = take(local(dataclasses.replace(cfg, seed=1)), 5)
    assert all(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, other))
    examples = {tuple(row["tokens"].tolist()) for row in rows_of(a)}
    assert len(examples) == 5 * ROWS, "an example repeated"


def test_exact_resume():
    cfg = SyntheticConfig(task="stack", seq_len=48, batch_size=ROWS)
    it = local(cfg)
    take(it, 4)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 3)
    fresh = local(cfg)
    fresh.set_state(state)
    assert_same(take(fresh, 3), expected)


def test_orbax_checkpoint_resume(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    cfg = SyntheticConfig(task="mqar", seq_len=48, batch_size=ROWS)
    it = local(cfg)
    take(it, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = take(it, 2)
    fresh = local(cfg)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert_same(take(fresh, 2), expected)


@pytest.mark.parametrize("count", [2, 4])
def test_processes_split_each_global_batch(count):
    cfg = SyntheticConfig(task="palindrome", seq_len=32, batch_size=ROWS)
    whole = take(local(cfg), 3)
    parts = [take(local(cfg, p, count), 3) for p in range(count)]
    for step, batch in enumerate(whole):
        assert all(part[step]["tokens"].shape == (ROWS // count, 32) for part in parts)
        assert_same([{k: np.concatenate([part[step][k] for part in parts]) for k in batch}], [batch])
    first, second = ({tuple(r["tokens"].tolist()) for r in rows_of(part)} for part in parts[:2])
    assert not first & second


def test_process_errors():
    cfg = SyntheticConfig(batch_size=ROWS)
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        synthetic_dataset(cfg, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="process_index"):
        synthetic_eval_batches(cfg, 1, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="num_batches"):
        synthetic_eval_batches(cfg, -1, process_index=0, process_count=1)


@pytest.mark.parametrize("task", ["mqar", "palindrome", "stack"])
def test_eval_batches(task):
    cfg = SyntheticConfig(task=task, seq_len=64, batch_size=ROWS)
    evals = synthetic_eval_batches(cfg, 3, process_index=0, process_count=1)
    assert len(evals) == 3 and synthetic_eval_batches(cfg, 0, process_index=0, process_count=1) == []
    assert_same(evals, synthetic_eval_batches(cfg, 3, process_index=0, process_count=1))
    check = {"mqar": lambda r: check_mqar(r, cfg, 15, 15),          # (64 - 1) // 4 pairs
             "palindrome": lambda r: check_palindrome(r, cfg, 31),  # (64 - 1) // 2
             "stack": lambda r: check_stack(r, cfg, 21)}[task]      # 64 // 3
    for row in rows_of(evals):
        check(row)
    held_out = {tuple(r["tokens"].tolist()) for r in rows_of(evals)}
    assert len(held_out) == 3 * ROWS
    for train_cfg in (cfg, dataclasses.replace(cfg, seed=cfg.eval_seed)):  # equal seeds: other streams
        assert not held_out & {tuple(r["tokens"].tolist()) for r in rows_of(take(local(train_cfg), 3))}
    other = synthetic_eval_batches(dataclasses.replace(cfg, eval_seed=5), 3, process_index=0, process_count=1)
    assert not held_out & {tuple(r["tokens"].tolist()) for r in rows_of(other)}
    halves = [synthetic_eval_batches(cfg, 3, process_index=p, process_count=2) for p in range(2)]
    assert_same([{k: np.concatenate([h0[k], h1[k]]) for k in h0} for h0, h1 in zip(*halves)], evals)


def test_config_defaults_and_derived_sizes():
    cfg = SyntheticConfig()
    assert (cfg.task, cfg.seq_len, cfg.batch_size, cfg.seed, cfg.eval_seed) == ("mqar", 256, 64, 0, 1)
    assert (cfg.kv_pairs, cfg.queries, cfg.example_len, cfg.model_vocab_size) == (63, 63, 253, 1092)
    assert SyntheticConfig(seq_len=2048).kv_pairs == 511
    pal = SyntheticConfig(task="palindrome", seq_len=1024)
    assert (pal.source_len, pal.example_len, pal.model_vocab_size) == (511, 1023, 36)
    stack = SyntheticConfig(task="stack", seq_len=1024, vocab_size=2000)
    assert (stack.ops, stack.example_len) == (341, 1023)
    assert (stack.min_vocab_size, stack.model_vocab_size) == (100, 2000)
    # sizes of other tasks are not checked against this task's row
    assert SyntheticConfig(task="palindrome", num_kv_pairs=5000, num_ops=5000).source_len == 127


@pytest.mark.parametrize("field,overrides", [
    ("task", {"task": "copy"}), ("seq_len", {"seq_len": 1}), ("seq_len", {"seq_len": 64.0}),
    ("batch_size", {"batch_size": 0}), ("batch_size", {"batch_size": True}), ("seed", {"seed": -1}),
    ("eval_seed", {"eval_seed": -1}), ("num_workers", {"num_workers": -1}), ("num_keys", {"num_keys": 0}),
    ("vocab_size", {"vocab_size": 1091}), ("vocab_size", {"task": "palindrome", "vocab_size": 35}),
    ("num_kv_pairs", {"num_kv_pairs": 0}), ("num_kv_pairs", {"num_kv_pairs": 64}),
    ("num_kv_pairs", {"num_keys": 10, "num_kv_pairs": 11}), ("num_queries", {"num_queries": 100}),
    ("num_queries", {"num_kv_pairs": 10, "num_queries": 11}), ("num_queries", {"num_queries": 200}),
    ("seq_len", {"seq_len": 4}), ("seq_len", {"task": "palindrome", "seq_len": 2}),
    ("palindrome_len", {"task": "palindrome", "palindrome_len": 128}),
    ("seq_len", {"task": "stack", "seq_len": 5}), ("num_ops", {"task": "stack", "num_ops": 1}),
    ("num_ops", {"task": "stack", "num_ops": 86}), ("push_prob", {"task": "stack", "push_prob": 1.0}),
    ("push_prob", {"push_prob": 0}), ("num_symbols", {"num_symbols": 0}),
])
def test_bad_fields_name_the_field(field, overrides):
    with pytest.raises(ValueError, match=f"SyntheticConfig.{field}"):
        SyntheticConfig(**overrides)


def hand_batch():
    """Row 0: answers 7, 9 at t = 2, 4; row 1: answer 5 at t = 1; row 2: no answer (padding)."""
    targets = np.array([[3, 1, 7, 2, 9, 0], [4, 5, 6, 0, 0, 0], [0, 0, 0, 0, 0, 0]], np.int32)
    mask = np.zeros((3, 6), np.float32)
    mask[0, [2, 4]] = mask[1, 1] = 1.0
    return {"targets": targets, "loss_mask": mask}


def as_ints(sums):
    return {k: int(v) for k, v in sums.items()}


def test_answer_metrics_on_hand_made_predictions():
    batch = hand_batch()
    right = np.full((3, 6), 99, np.int32)  # wrong everywhere but the answers
    right[0, 2], right[0, 4], right[1, 1] = 7, 9, 5
    assert as_ints(answer_metrics(right, batch)) == {"correct": 3, "supervised": 3, "exact": 2, "examples": 2}
    one_wrong = right.copy()
    one_wrong[0, 4] = 8
    sums = jax.jit(answer_metrics)(one_wrong, batch)
    assert as_ints(sums) == {"correct": 2, "supervised": 3, "exact": 1, "examples": 2}
    total = jax.tree.map(jnp.add, sums, answer_metrics(right, batch))
    summary = summarize(total)
    assert float(summary["token_accuracy"]) == pytest.approx(5 / 6)
    assert float(summary["exact_match"]) == pytest.approx(3 / 4)
    nothing = answer_metrics(right[2:], {k: v[2:] for k, v in batch.items()})
    assert as_ints(nothing) == {"correct": 0, "supervised": 0, "exact": 0, "examples": 0}
    assert {k: float(v) for k, v in summarize(nothing).items()} == {"token_accuracy": 0.0, "exact_match": 0.0}


def test_answer_metrics_on_a_task_batch():
    cfg = SyntheticConfig(task="stack", seq_len=30, batch_size=ROWS)
    batch = next(local(cfg))
    oracle = answer_metrics(batch["targets"], batch)
    n_pops = int(batch["loss_mask"].sum())
    rows_with_pops = int((batch["loss_mask"].sum(1) > 0).sum())
    assert as_ints(oracle) == {"correct": n_pops, "supervised": n_pops, "exact": rows_with_pops,
                               "examples": rows_with_pops}
    # predicting the input token is never the popped value (stack id vs value ids)
    assert as_ints(answer_metrics(batch["tokens"], batch))["correct"] == 0


@pytest.mark.slow
def test_worker_processes_give_the_same_stream():
    cfg = SyntheticConfig(task="stack", seq_len=48, batch_size=ROWS)
    expected = take(local(cfg), 5)
    it = local(dataclasses.replace(cfg, num_workers=2))
    got = [{k: np.array(v) for k, v in b.items()} for b in take(it, 3)]
    state = it.get_state()
    got += [{k: np.array(v) for k, v in b.items()} for b in take(it, 2)]
    it.close()
    assert_same(got, expected)
    fresh = local(dataclasses.replace(cfg, num_workers=2))
    fresh.set_state(state)
    resumed = [{k: np.array(v) for k, v in b.items()} for b in take(fresh, 2)]
    fresh.close()
    assert_same(resumed, expected[3:])
