"""End to end on a small text corpus: a run writes what it should; a killed run resumes exactly."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np

from kda_jax.train.config import CONFIG_DIR, parse
from kda_jax.train.loop import train

ROOT = pathlib.Path(__file__).parents[2]


def _corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler"]
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(12):
        text = "\n".join(" ".join(rng.choice(words, 9)) for _ in range(30))
        (d / f"doc{i}.txt").write_text(text)
    return d


def _params(corpus, steps, **extra):
    p = [f"DataConfig.path = '{corpus}'", "DataConfig.seq_len = 64", "DataConfig.batch_size = 8",
         "DataConfig.val_fraction = 0.2", "ModelSpec.preset = 'tiny'", f"TrainConfig.steps = {steps}",
         "TrainConfig.log_every = 1", "TrainConfig.eval_every = 4", "TrainConfig.eval_batches = 2",
         "TrainConfig.checkpoint_every = 2", "TrainConfig.sample_tokens = 16", "TrainConfig.sample_prompt = 'to be'",
         "OptimConfig.warmup_steps = 2", "OptimConfig.learning_rate = 1e-2", "MeshConfig.fsdp = 4", "MeshConfig.data = 2",
         # two layers (KDA + MLA, dense FFN + MoE) keep compilation short
         "ModelSpec.overrides = {'num_hidden_layers': 2, 'kda_layers': (1,), 'full_attn_layers': (2,)}"]
    return p + [f"{k} = {v}" for k, v in extra.items()]


def _losses(workdir):
    out = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def test_a_run_writes_metrics_checkpoints_config_and_a_sample(tmp_path):
    run = parse([CONFIG_DIR / "base.gin"], _params(_corpus(tmp_path), 8))
    summary = train(run, tmp_path / "run", progress=False)
    work = tmp_path / "run"
    assert (work / "config.gin").read_text() == run.operative
    losses = _losses(work)
    assert sorted(losses) == list(range(1, 9)) and losses[8] < losses[1]
    assert np.isfinite(summary["val_loss"]) and summary["sample"].startswith("to be")
    assert sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())[-1] == 8
    assert any((work / "tensorboard").iterdir())


def _command(corpus, steps, workdir):
    return [sys.executable, "-m", "kda_jax.train", f"--gin_file={CONFIG_DIR / 'base.gin'}", f"--workdir={workdir}",
            "--no_progress"] + [f"--gin_param={p}" for p in _params(corpus, steps)]


def test_kill_and_restart_reproduces_the_uninterrupted_losses(tmp_path):
    """Both runs are separate processes (the test process runs with float64 enabled)."""
    corpus = _corpus(tmp_path)
    steps = 10
    # the three processes compile the same programs: a shared persistent compilation cache makes the
    # later two load them instead (suite time; the executables, and so the losses, are the same)
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    reference = subprocess.run(_command(corpus, steps, tmp_path / "reference"), env=env, cwd=ROOT,
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]
    want = _losses(tmp_path / "reference")

    work = tmp_path / "killed"
    cmd = _command(corpus, steps, work)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (work / "metrics.jsonl").exists() and max(_losses(work), default=0) >= 5:
            proc.send_signal(signal.SIGKILL)  # mid-run, possibly mid-save
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    killed_at = max(_losses(work))
    assert killed_at < steps

    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from step" in result.stdout
    got = _losses(work)
    assert max(got) == steps
    for step in range(killed_at + 1, steps + 1):  # bit-exact
        assert got[step] == want[step], (step, got[step], want[step])
