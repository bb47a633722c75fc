"""``SyntheticConfig``: which synthetic task (Kimi Linear paper §5.1), its sizes, and batching.

A plain frozen dataclass; gin binds it from the training entry point, nothing here reads gin.

Token ids (the same for every task, so an id never changes meaning between tasks):

  0 PAD  right padding (segment 0)          2 PUSH  stack: push operation
  1 SEP  palindrome / MQAR separator        3 POP   stack: pop operation

and the task's own ids from ``NUM_SPECIAL = 4`` up, in disjoint ranges:

  palindrome  symbols       [4, 4 + num_symbols)
  mqar        keys          [4, 4 + num_keys),  values [4 + num_keys, 4 + num_keys + num_values)
  stack       stack ids     [4, 4 + num_stacks), values [4 + num_stacks, 4 + num_stacks + num_stack_values)

``vocab_size`` is the model's vocabulary: every id is below it. None means the smallest that
holds the task's ids (``min_vocab_size``); a larger value lets one model vocabulary serve
several tasks. Read the resolved value from ``model_vocab_size``.

Choices not fixed by the paper (design doc kimi_linear_model.md §5.3 proposes most of them):

- Every example is a real token sequence and ``targets`` is its next token, as in the text
  pipeline; ``loss_mask`` selects the answers. So an MQAR query is written ``key value`` (the
  value follows as the next input) and a stack operation is ``op id value``.
- Palindrome: ``num_symbols = 32``; the string length n defaults to (seq_len - 1) // 2, the
  longest that fits (2n + 1 tokens: string, SEP, reversed string).
- MQAR: ``num_keys = 1024``, ``num_values = 64``; n unique keys, values drawn with repetition.
  Every key is queried once in random order by default (``num_queries = None``), so an example
  is 2n + 1 + 2q tokens and ``num_kv_pairs = None`` takes the largest n that fits:
  (seq_len - 1) // 4 when every key is queried (63 at 256, 255 at 1024, 511 at 2048),
  (seq_len - 1 - 2q) // 2 for an explicit q, capped at ``num_keys``.
- Stack: ``num_stacks = 64``, ``num_stack_values = 32``, ``push_prob = 0.6``; ``num_ops``
  defaults to seq_len // 3 (3 tokens per operation). At least 2 operations (one push, one pop).
- ``batch_size = 64`` global rows (§5.3: 32-64); ``seq_len = 256`` (§5.3: start at 256/512 on
  CPU; the paper trains at 256-2048).
- ``num_workers`` only spreads the work over processes: the stream is the same for any value.
- ``eval_seed`` seeds the held-out examples; training and evaluation also draw from different
  streams (see ``pipeline``), so equal seeds still give different examples.
"""

from __future__ import annotations

import dataclasses

TASKS = ("mqar", "palindrome", "stack")
PAD, SEP, PUSH, POP = 0, 1, 2, 3
NUM_SPECIAL = 4


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    task: str = "mqar"
    seq_len: int = 256
    batch_size: int = 64            # global rows per step; each process gets batch_size / process_count
    vocab_size: int | None = None   # the model's vocabulary; None: min_vocab_size
    seed: int = 0                   # training examples
    eval_seed: int = 1              # held-out evaluation examples
    num_workers: int = 0            # grain worker processes (mp_prefetch); 0: prefetch threads only
    # palindrome
    num_symbols: int = 32
    palindrome_len: int | None = None   # None: (seq_len - 1) // 2
    # mqar
    num_keys: int = 1024
    num_values: int = 64
    num_kv_pairs: int | None = None     # None: the most that fit (module docstring)
    num_queries: int | None = None      # None: every key once
    # stack
    num_stacks: int = 64
    num_stack_values: int = 32
    num_ops: int | None = None          # None: seq_len // 3
    push_prob: float = 0.6

    def __post_init__(self):
        def bad(field: str, msg: str):
            raise ValueError(f"invalid SyntheticConfig.{field}: {msg}, got {getattr(self, field)!r}")

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if self.task not in TASKS:
            bad("task", f"must be one of {TASKS}")
        for field, low in (("seq_len", 2), ("batch_size", 1), ("seed", 0), ("eval_seed", 0),
                           ("num_workers", 0), ("num_symbols", 1), ("num_keys", 1), ("num_values", 1),
                           ("num_stacks", 1), ("num_stack_values", 1)):
            if not is_int(getattr(self, field)) or getattr(self, field) < low:
                bad(field, f"must be an integer >= {low}")
        for field in ("vocab_size", "palindrome_len", "num_kv_pairs", "num_queries", "num_ops"):
            value = getattr(self, field)
            if value is not None and (not is_int(value) or value < 1):
                bad(field, "must be None or an integer >= 1")
        if isinstance(self.push_prob, bool) or not isinstance(self.push_prob, (int, float)) \
                or not 0.0 < self.push_prob < 1.0:
            bad("push_prob", "must be a number in (0, 1)")
        if self.vocab_size is not None and self.vocab_size < self.min_vocab_size:
            bad("vocab_size", f"must be None or >= {self.min_vocab_size}, the ids of the {self.task} task")
        {"mqar": self._check_mqar, "palindrome": self._check_palindrome,
         "stack": self._check_stack}[self.task](bad)

    def _check_palindrome(self, bad):
        if self.palindrome_len is None and self.source_len < 1:
            bad("seq_len", "must be >= 3 for a palindrome (string, SEP, reversed string)")
        if self.example_len > self.seq_len:
            bad("palindrome_len", f"needs 2 * palindrome_len + 1 <= seq_len={self.seq_len}")

    def _check_mqar(self, bad):
        if self.num_kv_pairs is not None and self.num_kv_pairs > self.num_keys:
            bad("num_kv_pairs", f"must be <= num_keys={self.num_keys} (keys are unique)")
        if self.num_kv_pairs is None and self.kv_pairs < 1:
            if self.num_queries is not None:
                bad("num_queries", f"leaves no room for key-value pairs in seq_len={self.seq_len}")
            bad("seq_len", "leaves no room for a key-value pair and its query (needs >= 5)")
        if self.queries > self.kv_pairs:
            bad("num_queries", f"must be <= the number of key-value pairs ({self.kv_pairs})")
        if self.example_len > self.seq_len:
            field = "num_kv_pairs" if self.num_kv_pairs is not None else "num_queries"
            bad(field, f"needs 2 * pairs + 1 + 2 * queries = {self.example_len} <= seq_len={self.seq_len}")

    def _check_stack(self, bad):
        if self.ops < 2:
            bad("num_ops" if self.num_ops is not None else "seq_len",
                "must allow >= 2 stack operations (3 tokens each)")
        if self.example_len > self.seq_len:
            bad("num_ops", f"needs 3 * num_ops <= seq_len={self.seq_len}")

    @property
    def source_len(self) -> int:
        """Palindrome: the length n of the string that is reversed."""
        return self.palindrome_len if self.palindrome_len is not None else (self.seq_len - 1) // 2

    @property
    def queries(self) -> int:
        """MQAR: the number of queried keys."""
        return self.num_queries if self.num_queries is not None else self.kv_pairs

    @property
    def kv_pairs(self) -> int:
        """MQAR: the number of key-value pairs."""
        if self.num_kv_pairs is not None:
            return self.num_kv_pairs
        if self.num_queries is None:
            return min(self.num_keys, (self.seq_len - 1) // 4)
        return min(self.num_keys, (self.seq_len - 1 - 2 * self.num_queries) // 2)

    @property
    def ops(self) -> int:
        """Stack: the number of push/pop operations."""
        return self.num_ops if self.num_ops is not None else self.seq_len // 3

    @property
    def example_len(self) -> int:
        """Tokens in one example of the task (the rest of the row is padding)."""
        return {"palindrome": 2 * self.source_len + 1, "mqar": 2 * self.kv_pairs + 1 + 2 * self.queries,
                "stack": 3 * self.ops}[self.task]

    @property
    def min_vocab_size(self) -> int:
        """The smallest vocabulary that holds the task's ids (module docstring)."""
        return NUM_SPECIAL + {"palindrome": self.num_symbols, "mqar": self.num_keys + self.num_values,
                              "stack": self.num_stacks + self.num_stack_values}[self.task]

    @property
    def model_vocab_size(self) -> int:
        """The vocabulary a model trained on this task needs: vocab_size, or min_vocab_size when None."""
        return self.vocab_size if self.vocab_size is not None else self.min_vocab_size
