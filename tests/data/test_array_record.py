import dataclasses
import json

import numpy as np
import pytest

from kda_jax.data import DataConfig, eval_batches, load_corpus, train_iterator
from kda_jax.data.array_record import ArrayRecordCorpus, main, write_shards
from tests.data.helpers import tagged_docs, write_docs

DOCS = tagged_docs(20, seed=1, min_len=10, max_len=50) + ["ça — 生きる 🎭" * 3]


@pytest.fixture
def text_cfg(tmp_path):
    write_docs(tmp_path / "text", DOCS)
    return DataConfig(path=str(tmp_path / "text"), seq_len=16, batch_size=4, val_fraction=0.2)


def test_shards_give_the_batches_of_the_text(text_cfg, tmp_path):
    out = tmp_path / "shards"
    main(["--input", text_cfg.path, "--output", str(out), "--shard_docs", "6"])
    md = json.loads((out / "metadata.json").read_text())
    assert md["num_documents"] == len(DOCS) and len(md["shards"]) == 4 and md["dtype"] == "<u2"
    assert md["num_tokens"] == sum(len(d.encode()) for d in DOCS)
    shard_cfg = dataclasses.replace(text_cfg, path=str(out))
    corpus, text = ArrayRecordCorpus(out), load_corpus(text_cfg)
    for d in range(len(DOCS)):
        n = int(text.doc_lengths[d])
        np.testing.assert_array_equal(corpus.read(d, 0, n), text.read(d, 0, n))
        assert corpus.read(d, 0, n).dtype == np.int32
    a, b = (train_iterator(c, process_index=0, process_count=1) for c in (text_cfg, shard_cfg))
    for _ in range(12):
        x, y = next(a), next(b)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    for x, y in zip(eval_batches(text_cfg), eval_batches(shard_cfg), strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_shards_check_config_and_overwrite(text_cfg, tmp_path):
    out = tmp_path / "shards"
    write_shards(text_cfg.path, out, doc_split="paragraph")
    with pytest.raises(ValueError, match="doc_split"):
        load_corpus(dataclasses.replace(text_cfg, path=str(out)))
    with pytest.raises(FileExistsError, match="overwrite"):
        write_shards(text_cfg.path, out)
    md = write_shards(text_cfg.path, out, shard_docs=100, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["doc_lengths.npy", "metadata.json",
                                                     "shard-00000.array_record"]
    corpus = load_corpus(dataclasses.replace(text_cfg, path=str(out)))
    assert md["doc_split"] == "file" and len(corpus.doc_lengths) == len(DOCS)
    md["tokenizer_fingerprint"] = "sha256:0"
    (out / "metadata.json").write_text(json.dumps(md))
    with pytest.raises(ValueError, match="tokenizer"):
        load_corpus(dataclasses.replace(text_cfg, path=str(out)))
    (out / "shard-00000.array_record").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        load_corpus(dataclasses.replace(text_cfg, path=str(out)))


def test_writer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        write_shards(str(tmp_path / "nowhere"), tmp_path / "out")
    with pytest.raises(ValueError, match="shard_docs"):
        write_shards(str(tmp_path), tmp_path / "out", shard_docs=0)
