"""``DataConfig``: where the text is, how it is tokenised, split into train/validation, packed and batched.

A plain frozen dataclass; gin binds it from the training entry point, nothing here reads gin.
"""

from __future__ import annotations

import dataclasses

DOC_SPLITS = ("file", "paragraph")
SOURCES = ("text", "synthetic")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # A directory (every *.txt below it, or a shard directory written by
    # `python -m kda_jax.data.array_record`), a glob of text files, or one text file.
    path: str = "data/shakespeare"
    # "byte", a Hugging Face `tokenizers` JSON file, or a tiktoken BPE file (*.tiktoken).
    tokenizer: str = "byte"
    seq_len: int = 256
    batch_size: int = 16            # global rows per step; each process gets batch_size / process_count
    val_fraction: float = 0.05      # share of documents (of tokens, for a one-document corpus) held out
    seed: int = 0                   # training shuffle; each epoch is reshuffled from it
    num_workers: int = 0            # grain worker processes (mp_prefetch); 0: none
    doc_split: str = "file"         # "file": a file is a document; "paragraph": blank-line separated
    # "text": the fields above; "synthetic": a task of kda_jax.data.synthetic (SyntheticConfig), drawn
    # fresh every step — the text fields are then unused
    source: str = "text"
    split_seed: int = 0             # the validation split, apart from `seed` so runs share it

    def __post_init__(self):
        def bad(field: str, msg: str):
            raise ValueError(f"invalid DataConfig.{field}: {msg}, got {getattr(self, field)!r}")

        for field in ("path", "tokenizer"):
            if not isinstance(getattr(self, field), str) or not getattr(self, field):
                bad(field, "must be a non-empty string")
        for field, low, high in (("seq_len", 2, None), ("batch_size", 1, None), ("seed", 0, 2**32),
                                 ("num_workers", 0, None), ("split_seed", 0, 2**32)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < low \
                    or (high is not None and value >= high):
                bad(field, f"must be an integer >= {low}" + (f" and < {high}" if high else ""))
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)) \
                or not 0.0 <= self.val_fraction < 1.0:
            bad("val_fraction", "must be a number in [0, 1)")
        if self.source not in SOURCES:
            bad("source", f"must be one of {SOURCES}")
        if self.doc_split not in DOC_SPLITS:
            bad("doc_split", f"must be one of {DOC_SPLITS}")
