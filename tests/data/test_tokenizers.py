import base64
import json
import sys

import pytest

from kda_jax.data.tokenizers import ByteTokenizer, make_tokenizer

TEXT = "To be, or not to be — ça va? 生きるべきか 🎭\n"


def test_byte_round_trip():
    tok = make_tokenizer("byte")
    ids = tok.encode(TEXT)
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 256
    assert ids == list(TEXT.encode("utf-8")) and len(ids) > len(TEXT)  # multi-byte characters
    assert tok.decode(ids) == TEXT
    assert tok.bos_id is None and tok.eos_id is None
    assert tok.decode(ids[:-3]).endswith("\ufffd")  # a cut inside a character does not raise


@pytest.mark.parametrize("spec,error", [("bpe", ValueError), ("vocab.txt", ValueError),
                                        ("missing/tokenizer.json", FileNotFoundError),
                                        ("missing.tiktoken", FileNotFoundError)])
def test_unknown_or_missing_tokenizer(spec, error):
    with pytest.raises(error, match="tokenizer"):
        make_tokenizer(spec)


@pytest.mark.parametrize("module,suffix", [("tokenizers", ".json"), ("tiktoken", ".tiktoken")])
def test_optional_package_missing(tmp_path, monkeypatch, module, suffix):
    path = tmp_path / f"tok{suffix}"
    path.write_text("{}")
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(ImportError, match=f"pip install {module}"):
        make_tokenizer(str(path))


def test_hf_tokenizer_json(tmp_path):
    pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "</s>": 1, "to": 2, "be": 3, "or": 4, "not": 5}
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
            "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
            "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    tok = make_tokenizer(str(path))
    assert tok.encode("to be or not to be") == [2, 3, 4, 5, 2, 3]
    assert tok.vocab_size == 6 and tok.eos_id == 1 and tok.bos_id is None
    assert tok.fingerprint.startswith("sha256:")


def test_tiktoken_file(tmp_path):
    pytest.importorskip("tiktoken")
    ranks = [bytes([b]) for b in range(256)] + [b"th", b"the"]
    path = tmp_path / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))
    tok = make_tokenizer(str(path))
    assert tok.vocab_size == 258
    ids = tok.encode("the " + TEXT)
    assert ids[0] == 257 and tok.decode(ids) == "the " + TEXT
