"""Pre-tokenised corpora in array_record shards, and the corpus that reads them back.

    python -m kda_jax.data.array_record --input data/shakespeare --output data/shakespeare_byte \
        [--tokenizer byte] [--doc_split file] [--shard_docs 1000] [--overwrite]

One record per document (in `kda_jax.data.text` order): the token ids as raw little-endian
uint16 (vocabularies up to 65536) or int32. Beside the shards `shard-NNNNN.array_record`:
`metadata.json` (tokenizer spec and fingerprint, dtype, doc_split, counts, shard list) and
`doc_lengths.npy` (int64 tokens per document), so the piece index is built without reading
the shards. Records are written with group_size 1 for cheap random access. Pointing
`DataConfig.path` at the output directory gives the same documents, hence the same
validation split and batches, as the text it came from.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Sequence

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from kda_jax.data.config import DOC_SPLITS
from kda_jax.data.text import find_text_files, iter_documents
from kda_jax.data.tokenizers import Tokenizer, make_tokenizer

FORMAT = "kda_jax.tokens/1"
METADATA = "metadata.json"
LENGTHS = "doc_lengths.npy"


def is_shard_dir(path: str | pathlib.Path) -> bool:
    return (pathlib.Path(path) / METADATA).is_file()


def write_shards(input_path: str, output_dir: str | pathlib.Path, *, tokenizer: str = "byte",
                 doc_split: str = "file", shard_docs: int = 1000, overwrite: bool = False) -> dict:
    """Tokenise the text at `input_path` into shards under `output_dir`; returns the metadata."""
    if shard_docs < 1:
        raise ValueError(f"shard_docs must be >= 1, got {shard_docs}")
    if doc_split not in DOC_SPLITS:
        raise ValueError(f"doc_split must be one of {DOC_SPLITS}, got {doc_split!r}")
    out = pathlib.Path(output_dir)
    if is_shard_dir(out):
        if not overwrite:
            raise FileExistsError(f"{str(out)!r} already holds shards; pass overwrite=True (--overwrite)")
        old = json.loads((out / METADATA).read_text())
        for name in [s["file"] for s in old.get("shards", [])] + [METADATA, LENGTHS]:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(tokenizer)
    dtype = np.dtype("<u2") if tok.vocab_size <= 2**16 else np.dtype("<i4")
    lengths: list[int] = []
    shards: list[dict] = []
    writer = None
    for doc in iter_documents(find_text_files(input_path), doc_split):
        if len(lengths) % shard_docs == 0:
            if writer is not None:
                writer.close()
            shards.append({"file": f"shard-{len(shards):05d}.array_record", "num_documents": 0})
            writer = ArrayRecordWriter(str(out / shards[-1]["file"]), "group_size:1")
        ids = np.asarray(tok.encode(doc), dtype=dtype)
        writer.write(ids.tobytes())
        shards[-1]["num_documents"] += 1
        lengths.append(len(ids))
    if writer is None:
        raise FileNotFoundError(f"the text corpus at {input_path!r} is empty")
    writer.close()
    metadata = {"format": FORMAT, "tokenizer": tokenizer, "tokenizer_fingerprint": tok.fingerprint,
                "vocab_size": tok.vocab_size, "dtype": dtype.str, "doc_split": doc_split,
                "num_documents": len(lengths), "num_tokens": int(sum(lengths)), "shards": shards,
                "source": str(input_path)}
    np.save(out / LENGTHS, np.array(lengths, dtype=np.int64))
    (out / METADATA).write_text(json.dumps(metadata, indent=1) + "\n")
    return metadata


class ArrayRecordCorpus:
    """Documents read on demand from a shard directory written by `write_shards`."""

    def __init__(self, directory: str | pathlib.Path):
        directory = pathlib.Path(directory)
        self.metadata = json.loads((directory / METADATA).read_text())
        if self.metadata.get("format") != FORMAT:
            raise ValueError(f"{str(directory / METADATA)!r} is not a {FORMAT} shard index "
                             f"(format {self.metadata.get('format')!r})")
        paths = [directory / s["file"] for s in self.metadata["shards"]]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"shards listed in {str(directory / METADATA)!r} are missing: {missing}")
        self.doc_lengths = np.load(directory / LENGTHS)
        self._dtype = np.dtype(self.metadata["dtype"])
        self._source = grain.sources.ArrayRecordDataSource([str(p) for p in paths])
        if len(self._source) != len(self.doc_lengths) or len(self._source) != self.metadata["num_documents"]:
            raise ValueError(f"{str(directory)!r}: {len(self._source)} records, {len(self.doc_lengths)} "
                             f"lengths, metadata says {self.metadata['num_documents']}")

    def check(self, tokenizer: Tokenizer, doc_split: str):
        """The configured tokenizer and doc_split must be the ones the shards were written with."""
        md = self.metadata
        if md["tokenizer_fingerprint"] != tokenizer.fingerprint:
            raise ValueError(f"DataConfig.tokenizer ({tokenizer.fingerprint}) differs from the shards' "
                             f"tokenizer {md['tokenizer']!r} ({md['tokenizer_fingerprint']})")
        if md["doc_split"] != doc_split:
            raise ValueError(f"DataConfig.doc_split is {doc_split!r} but the shards were written "
                             f"with doc_split={md['doc_split']!r}")

    def read(self, doc: int, start: int, stop: int) -> np.ndarray:
        return np.frombuffer(self._source[doc], dtype=self._dtype)[start:stop].astype(np.int32)


def main(argv: Sequence[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="text directory (*.txt below it), glob or file")
    parser.add_argument("--output", required=True, help="shard directory to write")
    parser.add_argument("--tokenizer", default="byte", help="'byte', a tokenizer.json or a *.tiktoken file")
    parser.add_argument("--doc_split", default="file", choices=DOC_SPLITS)
    parser.add_argument("--shard_docs", type=int, default=1000, help="documents per shard")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --output")
    args = parser.parse_args(argv)
    md = write_shards(args.input, args.output, tokenizer=args.tokenizer, doc_split=args.doc_split,
                      shard_docs=args.shard_docs, overwrite=args.overwrite)
    print(f"wrote {md['num_documents']} documents, {md['num_tokens']} tokens in {len(md['shards'])} "
          f"shards to {args.output}")


if __name__ == "__main__":
    main()
