"""A synthetic-task run through the real training loop: data source switch, accuracy metrics, errors."""

import json

import pytest

from kda_jax.train.config import CONFIG_DIR, parse
from kda_jax.train.loop import train

# one KDA layer (no MLA, as in mqar.gin): the run's compile time is mostly the KDA layers'
SMALL = ["ModelSpec.overrides = {'vocab_size': 1152, 'hidden_size': 64, 'num_hidden_layers': 1, "
         "'kda_layers': (1,), 'full_attn_layers': (), 'kda_num_heads': 2, 'kda_head_dim': 32, "
         "'intermediate_size': 128, 'num_experts': 0}",
         "SyntheticConfig.seq_len = 64", "SyntheticConfig.batch_size = 8", "TrainConfig.steps = 2",
         "TrainConfig.eval_every = 2", "TrainConfig.log_every = 1", "TrainConfig.eval_batches = 1"]


def test_mqar_run_logs_answer_accuracy(tmp_path):
    run = parse([CONFIG_DIR / "experiments" / "synthetic" / "mqar.gin"], SMALL)
    assert run.synthetic is not None and run.synthetic.task == "mqar" and run.model.full_attn_layers == ()
    summary = train(run, tmp_path, progress=False)
    assert 0.0 <= summary["val_token_accuracy"] <= 1.0 and 0.0 <= summary["val_exact_match"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("val_exact_match" in r for r in rows) and all("sample" not in r for r in rows)
    assert "SyntheticConfig.task = 'mqar'" in (tmp_path / "config.gin").read_text()


def test_a_batch_the_mesh_cannot_split_is_named(tmp_path):
    run = parse([CONFIG_DIR / "experiments" / "synthetic" / "mqar.gin"], SMALL + ["SyntheticConfig.batch_size = 4"])
    with pytest.raises(ValueError, match=r"global batch \(4 rows\).*data × fsdp size \(8\)"):
        train(run, tmp_path, progress=False)


def test_text_runs_have_no_synthetic_config_and_a_too_small_vocabulary_is_named():
    assert parse([CONFIG_DIR / "experiments" / "shakespeare_small.gin"]).synthetic is None
    with pytest.raises(ValueError, match="SyntheticConfig.*1092.*vocab_size=256"):
        parse([CONFIG_DIR / "experiments" / "synthetic" / "mqar.gin"], ["ModelSpec.overrides = {}"])
