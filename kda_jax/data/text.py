"""Plain-text corpora: find the files, split them into documents, tokenise them into memory.

Files are read in sorted path order as UTF-8 (universal newlines), so document indices are
the same on every machine. A document is a whole file (`doc_split="file"`) or a paragraph
between blank lines (`"paragraph"`, surrounding newlines removed). Whitespace-only documents
are dropped.
"""

from __future__ import annotations

import glob
import pathlib
import re
from collections.abc import Iterator, Sequence

import numpy as np

from kda_jax.data.tokenizers import Tokenizer

_BLANK_LINE = re.compile(r"\n[ \t\f\v]*\n")


def find_text_files(path: str) -> list[pathlib.Path]:
    """A directory: every *.txt below it; a glob: the files it matches; else the one file."""
    p = pathlib.Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
    elif p.is_file():
        files = [p]
    elif any(c in path for c in "*?["):
        files = sorted(pathlib.Path(f) for f in glob.glob(path, recursive=True) if pathlib.Path(f).is_file())
    else:
        raise FileNotFoundError(f"data path {path!r} does not exist")
    if not files:
        raise FileNotFoundError(f"no text files at data path {path!r} (a directory is searched for *.txt)")
    return files


def iter_documents(files: Sequence[pathlib.Path], doc_split: str) -> Iterator[str]:
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{str(f)!r} is not UTF-8 text: {e}") from e
        parts = [text] if doc_split == "file" else [p.strip("\n") for p in _BLANK_LINE.split(text)]
        yield from (p for p in parts if p.strip())


class TokenCorpus:
    """Tokenised documents held in memory: one int32 array and the document lengths."""

    def __init__(self, tokens: np.ndarray, doc_lengths: np.ndarray):
        self.tokens = tokens
        self.doc_lengths = doc_lengths
        self._offsets = np.concatenate([[0], np.cumsum(doc_lengths)])

    def read(self, doc: int, start: int, stop: int) -> np.ndarray:
        offset = self._offsets[doc]
        return self.tokens[offset + start:offset + stop]


def load_text_corpus(path: str, doc_split: str, tokenizer: Tokenizer) -> TokenCorpus:
    docs = [np.asarray(tokenizer.encode(d), dtype=np.int32)
            for d in iter_documents(find_text_files(path), doc_split)]
    if not docs:
        raise FileNotFoundError(f"the text corpus at data path {path!r} is empty")
    return TokenCorpus(np.concatenate(docs), np.array([len(d) for d in docs], dtype=np.int64))
