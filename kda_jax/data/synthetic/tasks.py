"""One example of each synthetic task: pure NumPy, a row of the text pipeline's batch format.

``make_example(cfg, rng)`` returns, every array ``[seq_len]`` (the keys and dtypes of
``kda_jax.data.packing``):

  tokens      int32    the example, then PAD (0)
  targets     int32    the next token of the example, 0 at its last token and in padding
  loss_mask   float32  1 at the answer positions only (the target there is the answer)
  segment_ids int32    1 on the example, 0 in padding
  positions   int32    0, 1, 2, ... on the example, 0 in padding

The formats (ids and sizes in ``config``; ``a .. b`` are the example's tokens, n = cfg sizes):

- Palindrome: ``x_1 .. x_n SEP x_n .. x_1`` with x uniform over the symbols. The answers are
  the reversed string: positions n (SEP) .. 2n - 1, whose targets are x_n .. x_1.
- MQAR: ``k_1 v_1 .. k_n v_n SEP k_a v_a k_b v_b ..``: n unique keys, values uniform (a value
  may repeat), then q distinct keys in random order, each followed by its value. The answers
  are the values of the queries: the targets at the q query-key positions 2n + 1 + 2j.
- Stack: ``op_1 s_1 x_1 .. op_m s_m x_m``: op PUSH puts value x on stack s; op POP removes the
  top of the non-empty stack s, and x is that removed value. Operation i is a push with
  probability push_prob (always, while every stack is empty), on a uniform stack with a uniform
  value; a pop takes a uniform non-empty stack. The answers are the popped values: the target
  at the stack-id position 3i + 1 of each pop.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from kda_jax.data.synthetic.config import NUM_SPECIAL, POP, PUSH, SEP, SyntheticConfig

Example = dict[str, np.ndarray]


def _row(tokens: np.ndarray, answers: np.ndarray, seq_len: int) -> Example:
    """The padded row of one example whose supervised positions are `answers`."""
    n = len(tokens)
    row = {"tokens": np.zeros(seq_len, np.int32), "targets": np.zeros(seq_len, np.int32),
           "loss_mask": np.zeros(seq_len, np.float32), "segment_ids": np.zeros(seq_len, np.int32),
           "positions": np.zeros(seq_len, np.int32)}
    row["tokens"][:n] = tokens
    row["targets"][:n - 1] = tokens[1:]
    row["loss_mask"][answers] = 1.0
    row["segment_ids"][:n] = 1
    row["positions"][:n] = np.arange(n)
    return row


def palindrome_example(cfg: SyntheticConfig, rng: np.random.Generator) -> Example:
    n = cfg.source_len
    source = NUM_SPECIAL + rng.integers(cfg.num_symbols, size=n)
    tokens = np.concatenate([source, [SEP], source[::-1]])
    return _row(tokens, np.arange(n, 2 * n), cfg.seq_len)


def mqar_example(cfg: SyntheticConfig, rng: np.random.Generator) -> Example:
    n, q = cfg.kv_pairs, cfg.queries
    keys = NUM_SPECIAL + rng.choice(cfg.num_keys, size=n, replace=False)
    values = NUM_SPECIAL + cfg.num_keys + rng.integers(cfg.num_values, size=n)
    asked = rng.permutation(n)[:q]
    tokens = np.empty(2 * n + 1 + 2 * q, np.int64)
    tokens[0:2 * n:2], tokens[1:2 * n:2], tokens[2 * n] = keys, values, SEP
    tokens[2 * n + 1::2], tokens[2 * n + 2::2] = keys[asked], values[asked]
    return _row(tokens, 2 * n + 1 + 2 * np.arange(q), cfg.seq_len)


def stack_example(cfg: SyntheticConfig, rng: np.random.Generator) -> Example:
    m = cfg.ops
    # Every random number is drawn up front (vectorised); the loop only moves Python ints.
    push = (rng.random(m) < cfg.push_prob).tolist()
    stack_draw = rng.integers(cfg.num_stacks, size=m).tolist()
    value_draw = rng.integers(cfg.num_stack_values, size=m).tolist()
    pick_draw = rng.random(m).tolist()
    stacks: list[list[int]] = [[] for _ in range(cfg.num_stacks)]
    nonempty: list[int] = []           # the non-empty stacks, in no particular order
    slot: dict[int, int] = {}          # stack id -> its index in `nonempty`
    ops, ids, vals, answers = [], [], [], []
    for i in range(m):
        if push[i] or not nonempty:
            s, x = stack_draw[i], value_draw[i]
            if not stacks[s]:
                slot[s] = len(nonempty)
                nonempty.append(s)
            stacks[s].append(x)
            ops.append(PUSH)
        else:
            s = nonempty[int(pick_draw[i] * len(nonempty))]
            x = stacks[s].pop()
            if not stacks[s]:  # swap-remove s from `nonempty`
                last = nonempty.pop()
                if last != s:
                    nonempty[slot[s]] = last
                    slot[last] = slot[s]
                del slot[s]
            ops.append(POP)
            answers.append(3 * i + 1)
        ids.append(s)
        vals.append(x)
    tokens = np.stack([np.array(ops), NUM_SPECIAL + np.array(ids),
                       NUM_SPECIAL + cfg.num_stacks + np.array(vals)], axis=1).reshape(-1)
    return _row(tokens, np.array(answers, np.int64), cfg.seq_len)


GENERATORS: dict[str, Callable[[SyntheticConfig, np.random.Generator], Example]] = {
    "mqar": mqar_example, "palindrome": palindrome_example, "stack": stack_example}


def make_example(cfg: SyntheticConfig, rng: np.random.Generator) -> Example:
    """One example of ``cfg.task`` drawn from `rng` (the module docstring gives the formats)."""
    return GENERATORS[cfg.task](cfg, rng)
