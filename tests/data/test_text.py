import numpy as np
import pytest

from kda_jax.data.text import find_text_files, iter_documents, load_text_corpus
from kda_jax.data.tokenizers import ByteTokenizer
from tests.data.helpers import write_docs


def test_directory_glob_and_file_paths(tmp_path):
    write_docs(tmp_path / "g" / "sub", ["three"])
    write_docs(tmp_path / "g", ["one doc", "two doc"])
    (tmp_path / "g" / "notes.md").write_text("not text")
    names = [f.relative_to(tmp_path / "g").as_posix() for f in find_text_files(str(tmp_path / "g"))]
    assert names == ["doc_0000.txt", "doc_0001.txt", "sub/doc_0000.txt"]  # recursive, sorted
    assert len(find_text_files(str(tmp_path / "g" / "doc_000[01].txt"))) == 2
    assert len(find_text_files(str(tmp_path / "g" / "**" / "*.txt"))) == 3
    assert find_text_files(str(tmp_path / "g" / "doc_0001.txt")) == [tmp_path / "g" / "doc_0001.txt"]


def test_documents_and_tokens(tmp_path):
    files = [write_docs(tmp_path / "p", ["first para\nline two\n\n\nsecond\n \nthird\n", "\n\n", "fourth"])
             / f"doc_000{i}.txt" for i in range(3)]
    assert list(iter_documents(files, "paragraph")) == ["first para\nline two", "second", "third", "fourth"]
    assert list(iter_documents(files, "file")) == ["first para\nline two\n\n\nsecond\n \nthird\n", "fourth"]
    corpus = load_text_corpus(str(tmp_path / "p"), "paragraph", ByteTokenizer())
    assert corpus.doc_lengths.tolist() == [19, 6, 5, 6] and corpus.tokens.dtype == np.int32
    assert bytes(corpus.read(1, 1, 4).tolist()) == b"eco"


def test_missing_empty_and_undecodable(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_text_files(str(tmp_path / "nowhere"))
    (tmp_path / "none").mkdir()
    with pytest.raises(FileNotFoundError, match="no text files"):
        find_text_files(str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="no text files"):
        find_text_files(str(tmp_path / "none" / "*.txt"))
    write_docs(tmp_path / "blank", ["", "  \n\n"])
    with pytest.raises(FileNotFoundError, match="blank.*empty"):
        load_text_corpus(str(tmp_path / "blank"), "file", ByteTokenizer())
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="bad.txt.*not UTF-8"):
        load_text_corpus(str(tmp_path / "bad.txt"), "file", ByteTokenizer())
