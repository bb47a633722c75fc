"""Tokenizers: UTF-8 bytes (the default, no files), a Hugging Face `tokenizers` JSON, a tiktoken BPE file.

No tokenizer adds special tokens when encoding: packed documents are told apart by segment ids.
`bos_id` / `eos_id` are reported for inference where the vocabulary has them. `fingerprint`
identifies the vocabulary (the file's sha256), so pre-tokenised shards can be checked against
the configured tokenizer. `tokenizers` and `tiktoken` are optional and imported only when used.
"""

from __future__ import annotations

import hashlib
import importlib
import pathlib
from collections.abc import Sequence
from typing import Protocol

BYTE = "byte"
# Split pattern for *.tiktoken files, which store only the merge ranks: contractions, runs of
# letters or up to three digits or punctuation each with one leading space, then whitespace.
# A file trained with another pattern still round-trips exactly; only the merges found differ.
TIKTOKEN_PATTERN = (r"'(?i:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Names under which tokenizer.json files commonly carry their document delimiters.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "[BOS]", "<|startoftext|>")
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[EOS]")


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    fingerprint: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes: ids 0..255, no special tokens."""

    vocab_size = 256
    bos_id = None
    eos_id = None
    fingerprint = BYTE

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # A cut through a multi-byte character (a piece boundary) decodes to U+FFFD.
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def _import_optional(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"this tokenizer needs the optional package {package!r}: "
                          f"pip install {package}") from e


def _file_fingerprint(path: pathlib.Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file (tokenizer.json), encoded without special tokens."""

    def __init__(self, path: str | pathlib.Path):
        path = pathlib.Path(path)
        self._tok = _import_optional("tokenizers", "tokenizers").Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = next((i for n in _BOS_NAMES if (i := self._tok.token_to_id(n)) is not None), None)
        self.eos_id = next((i for n in _EOS_NAMES if (i := self._tok.token_to_id(n)) is not None), None)
        self.fingerprint = _file_fingerprint(path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class TiktokenTokenizer:
    """A tiktoken BPE file (one `base64-token rank` per line), split with `TIKTOKEN_PATTERN`."""

    def __init__(self, path: str | pathlib.Path, pattern: str = TIKTOKEN_PATTERN):
        path = pathlib.Path(path)
        tiktoken = _import_optional("tiktoken", "tiktoken")
        ranks = _import_optional("tiktoken.load", "tiktoken").load_tiktoken_bpe(str(path))
        self._enc = tiktoken.Encoding(name=path.stem, pat_str=pattern, mergeable_ranks=ranks,
                                      special_tokens={})
        self.vocab_size = self._enc.n_vocab
        self.bos_id = None
        self.eos_id = None
        self.fingerprint = _file_fingerprint(path)

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(i) for i in ids], errors="replace")


def make_tokenizer(spec: str) -> Tokenizer:
    """"byte", a path to a tokenizer.json-style file (*.json), or a path to a *.tiktoken file."""
    if spec == BYTE:
        return ByteTokenizer()
    path = pathlib.Path(spec)
    if path.suffix not in (".json", ".tiktoken"):
        raise ValueError(f"unknown tokenizer {spec!r}: expected 'byte', a Hugging Face tokenizers "
                         "*.json file or a tiktoken *.tiktoken file")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {spec!r} does not exist")
    return HFTokenizer(path) if path.suffix == ".json" else TiktokenTokenizer(path)
