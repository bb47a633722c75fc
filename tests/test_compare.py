"""kda_jax.compare on hand-written workdirs (known numbers) and on one real tiny training run."""

import json
import math
import pathlib

import numpy as np
import pytest
from PIL import Image

from kda_jax.compare import load_run, main, write_report
from kda_jax.inference.cache import cache_bytes
from kda_jax.models import count_params, get_config, variant
from kda_jax.train.flops import flops_per_token

ROWS, ROW_LEN = 4, 32          # DataConfig of the fake runs: 128 tokens per step


def _config(variant_name: str | None = None, lr: float = 1e-3) -> str:
    lines = ["ModelSpec.preset = 'tiny'", f"DataConfig.batch_size = {ROWS}", f"DataConfig.seq_len = {ROW_LEN}",
             f"OptimConfig.learning_rate = {lr}", "TrainConfig.steps = 100"]
    if variant_name:
        lines.append(f"ModelSpec.variant = '{variant_name}'")
    return "\n".join(lines) + "\n"


def _workdir(path: pathlib.Path, records: list[dict], config: str) -> pathlib.Path:
    path.mkdir(parents=True)
    (path / "config.gin").write_text(config)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# Run "hyb": losses logged every 10 steps; step 100 appears twice (a resumed run: the later line
# counts); FLOPs per token are logged; throughput windows 50 (compilation), 100, 300, 200.
HYB_LOSS = {10: 5.0, 20: 4.0, 30: 3.6, 40: 3.2, 50: 3.0, 60: 2.9, 70: 2.8, 80: 2.7, 90: 2.6, 100: 2.5}
HYB_RECORDS = (
    [{"step": s, "loss": v, "flops_per_token": 1000.0} for s, v in HYB_LOSS.items()]
    + [{"step": 50, "val_loss": 3.1, "val_ppl": math.exp(3.1)}, {"step": 100, "val_loss": 2.75, "val_ppl": 15.6}]
    + [{"step": s, "tokens_per_second": t} for s, t in ((10, 50.0), (20, 100.0), (30, 300.0), (40, 200.0))]
    + [{"step": 100, "tag": "sample", "text": "ROMEO: hi"}, {"step": 100, "loss": 2.4}]
)
# Run "mla": logged every 5 steps, no FLOPs, no val_ppl (the report derives exp(val_loss)).
MLA_RECORDS = ([{"step": s, "loss": 3.0 + (100 - s) / 100} for s in range(5, 101, 5)]
               + [{"step": 100, "val_loss": 3.0}, {"step": 20, "tokens_per_second": 80.0}])


@pytest.fixture
def fake_runs(tmp_path):
    hyb = _workdir(tmp_path / "runs" / "hyb", HYB_RECORDS, _config())
    mla = _workdir(tmp_path / "runs" / "mla", MLA_RECORDS, _config("mla_only"))
    return hyb, mla


def test_table_values_from_known_metrics(fake_runs, tmp_path):
    report = write_report(fake_runs, tmp_path / "report")
    rows = {r["label"]: r for r in json.loads((report.parent / "summary.json").read_text())["runs"]}
    hyb, mla = rows["hyb"], rows["mla"]
    tiny, tiny_mla = get_config("tiny"), variant(get_config("tiny"), "mla_only")

    assert hyb["steps"] == 100 and hyb["tokens"] == 100 * 128
    assert hyb["train_flops"] == pytest.approx(100 * 128 * 1000.0)
    assert hyb["train_loss"] == pytest.approx(2.4)             # last 10% of 100 steps: only step 100, resumed
    assert hyb["val_loss"] == pytest.approx(2.75) and hyb["val_ppl"] == pytest.approx(15.6)
    assert hyb["tokens_per_second"] == pytest.approx(200.0)     # median of 100, 300, 200
    assert hyb["layout"] == "3:1 (3 KDA + 1 MLA)"
    assert (hyb["params_total"], hyb["params_activated"]) == count_params(tiny)

    assert mla["train_loss"] == pytest.approx((3.05 + 3.0) / 2)  # steps 95 and 100
    assert mla["val_ppl"] == pytest.approx(math.exp(3.0))
    assert mla["tokens_per_second"] == pytest.approx(80.0)      # one window: kept
    assert mla["train_flops"] == pytest.approx(100 * 128 * flops_per_token(tiny_mla, ROW_LEN)["train"])
    assert mla["layout"] == "0:1 (all 4 MLA)"
    assert (mla["params_total"], mla["params_activated"]) == count_params(tiny_mla)
    assert mla["params_total"] != hyb["params_total"]
    # MLA caches (kv_lora_rank + rope dim) bf16 values per token and layer: 4 layers × (32 + 8) × 2 bytes.
    assert mla["cache_bytes"]["4096"] == 4 * 4096 * 40 * 2 == cache_bytes(tiny_mla, 4096, 1)["total"]

    text = report.read_text()
    assert "| hyb | 3:1 (3 KDA + 1 MLA) |" in text and "| 2.4000 | 2.7500 | 15.600 | 200 |" in text
    assert "share their recipe" in text and "`full_attn_layers`: (4,) / (1, 2, 3, 4)" in text


def test_plots_are_valid_pngs(fake_runs, tmp_path):
    report = write_report(fake_runs, tmp_path / "report", labels=["KDA 3:1", "MLA"])
    text = report.read_text()
    names = ["loss_tokens", "loss_flops", "val_loss_tokens", "throughput", "cache"]
    for name in names:
        path = report.parent / f"{name}.png"
        assert f"]({name}.png)" in text
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
            assert np.asarray(im.convert("L")).std() > 1.0  # something was drawn
    assert "| KDA 3:1 |" in text


def test_recipe_difference_is_reported(tmp_path):
    a = _workdir(tmp_path / "a", MLA_RECORDS, _config(lr=1e-3))
    b = _workdir(tmp_path / "b", MLA_RECORDS, _config(lr=2e-3))
    text = write_report([a, b], tmp_path / "out").read_text()
    assert "recipes differ" in text and "`learning_rate` = 0.001 / 0.002" in text
    assert "The models are identical." in text


def test_errors_name_the_workdir(tmp_path):
    with pytest.raises(FileNotFoundError, match="workdir .*nowhere does not exist"):
        load_run(tmp_path / "nowhere")
    empty = _workdir(tmp_path / "empty", [], _config())
    with pytest.raises(ValueError, match="workdir .*empty: metrics.jsonl has no training-loss records"):
        load_run(empty)
    only_val = _workdir(tmp_path / "only_val", [{"step": 10, "val_loss": 2.0}], _config())
    with pytest.raises(ValueError, match="only_val: metrics.jsonl has no training-loss"):
        load_run(only_val)
    no_config = _workdir(tmp_path / "no_config", MLA_RECORDS, "")
    (no_config / "config.gin").unlink()
    with pytest.raises(FileNotFoundError, match="no_config has no config.gin"):
        load_run(no_config)
    bad_config = _workdir(tmp_path / "bad_config", MLA_RECORDS, "ModelSpec.presett = 'tiny'\n")
    with pytest.raises(ValueError, match="bad_config: config.gin does not parse.*presett"):
        load_run(bad_config)
    cut_config = _workdir(tmp_path / "cut_config", MLA_RECORDS, "ModelSpec.overrides = {'output_gate': (\n")
    with pytest.raises(ValueError, match="cut_config: config.gin does not parse"):
        load_run(cut_config)
    bad_metrics = _workdir(tmp_path / "bad_metrics", MLA_RECORDS, _config())
    with (bad_metrics / "metrics.jsonl").open("a") as f:
        f.write("{not json\n" + json.dumps({"step": 200, "loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="bad_metrics: metrics.jsonl is corrupt"):
        load_run(bad_metrics)


def test_labels_and_cli(fake_runs, tmp_path, capsys):
    with pytest.raises(ValueError, match="2 workdirs"):
        write_report(fake_runs, tmp_path / "x", labels=["only one"])
    with pytest.raises(ValueError, match="unique"):
        write_report(fake_runs, tmp_path / "x", labels=["same", "same"])
    twins = [_workdir(tmp_path / p / "run", MLA_RECORDS, _config()) for p in ("first", "second")]
    rows = json.loads((write_report(twins, tmp_path / "t").parent / "summary.json").read_text())["runs"]
    assert [r["label"] for r in rows] == ["first/run", "second/run"]

    assert main(["--workdirs", *map(str, fake_runs), "--out", str(tmp_path / "cli"),
                 "--context_lengths", "128", "256"]) == 0
    assert "| 128 tokens | 256 tokens |" in (tmp_path / "cli" / "report.md").read_text()
    with pytest.raises(SystemExit) as e:
        main(["--workdirs", str(tmp_path / "missing"), "--out", str(tmp_path / "cli2")])
    assert e.value.code == 2 and "missing does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_real_tiny_runs(tmp_path):
    from kda_jax.train.config import parse
    from kda_jax.train.loop import train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(["to", "be", "or", "not"], 400)))
    common = [f"DataConfig.path = '{corpus}'", "DataConfig.seq_len = 32", "DataConfig.batch_size = 8",
              "DataConfig.val_fraction = 0.25", "ModelSpec.preset = 'tiny'", "TrainConfig.steps = 4",
              "TrainConfig.log_every = 2", "TrainConfig.eval_every = 2", "TrainConfig.eval_batches = 1",
              "TrainConfig.checkpoint_every = 4", "TrainConfig.sample_tokens = 0", "OptimConfig.warmup_steps = 1",
              "ModelSpec.overrides = {'num_hidden_layers': 2, 'kda_layers': (1,), 'full_attn_layers': (2,)}"]
    workdirs = []
    for name, extra in (("hybrid", []), ("mla", ["ModelSpec.variant = 'mla_only'"])):
        train(parse([], common + extra), tmp_path / name, progress=False)
        workdirs.append(tmp_path / name)
    report = write_report(workdirs, tmp_path / "report")
    rows = json.loads((report.parent / "summary.json").read_text())["runs"]
    for row, workdir in zip(rows, workdirs):
        logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        assert row["steps"] == 4 and row["tokens"] == 4 * 8 * 32
        assert row["train_loss"] == pytest.approx([r["loss"] for r in logged if "loss" in r][-1])
        assert row["val_loss"] == pytest.approx([r["val_loss"] for r in logged if "val_loss" in r][-1])
    assert [r["layout"] for r in rows] == ["1:1 (1 KDA + 1 MLA)", "0:1 (all 2 MLA)"]
