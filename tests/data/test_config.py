import pytest

from kda_jax.data import DataConfig


def test_defaults():
    cfg = DataConfig()
    assert (cfg.path, cfg.tokenizer, cfg.seq_len, cfg.batch_size) == ("data/shakespeare", "byte", 256, 16)
    assert (cfg.val_fraction, cfg.seed, cfg.num_workers, cfg.doc_split) == (0.05, 0, 0, "file")


@pytest.mark.parametrize("field,value", [
    ("path", ""), ("tokenizer", ""), ("seq_len", 1), ("seq_len", 16.0), ("batch_size", 0),
    ("batch_size", True), ("val_fraction", 1.0), ("val_fraction", -0.1), ("seed", -1), ("seed", 2**32),
    ("num_workers", -1), ("doc_split", "line"), ("split_seed", -2),
])
def test_bad_fields_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"DataConfig.{field}"):
        DataConfig(**{field: value})
