"""End to end on a small text corpus: a run writes what it should; a killed run resumes exactly.

Both tests (and ``tests/inference/test_generate.py::test_generate_command_from_a_training_workdir``)
read one uninterrupted run, the session fixture ``text_run`` (tests/conftest.py, made by
``make_text_run``), so it is trained once per test process; the three share an xdist group.
"""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from kda_jax.train.config import CONFIG_DIR, parse

ROOT = pathlib.Path(__file__).parents[2]
STEPS = 10  # of the reference run; the killed run stops at step 5 or later


def _corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler"]
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(12):
        text = "\n".join(" ".join(rng.choice(words, 9)) for _ in range(30))
        (d / f"doc{i}.txt").write_text(text)
    return d


def _params(corpus, steps):
    return [f"DataConfig.path = '{corpus}'", "DataConfig.seq_len = 64", "DataConfig.batch_size = 8",
         "DataConfig.val_fraction = 0.2", "ModelSpec.preset = 'tiny'", f"TrainConfig.steps = {steps}",
         "TrainConfig.log_every = 1", "TrainConfig.eval_every = 4", "TrainConfig.eval_batches = 2",
         "TrainConfig.checkpoint_every = 2", "TrainConfig.sample_tokens = 16", "TrainConfig.sample_prompt = 'to be'",
         "OptimConfig.warmup_steps = 2", "OptimConfig.learning_rate = 1e-2", "MeshConfig.fsdp = 4", "MeshConfig.data = 2",
         # two layers (KDA + MLA, dense FFN + MoE) keep compilation short
         "ModelSpec.overrides = {'num_hidden_layers': 2, 'kda_layers': (1,), 'full_attn_layers': (2,)}"]


def _rows(workdir):
    out = []
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return out


def _losses(workdir):
    return {rec["step"]: rec["loss"] for rec in _rows(workdir) if "loss" in rec}


def _command(corpus, steps, workdir):
    return [sys.executable, "-m", "kda_jax.train", f"--gin_file={CONFIG_DIR / 'base.gin'}", f"--workdir={workdir}",
            "--no_progress"] + [f"--gin_param={p}" for p in _params(corpus, steps)]


@dataclasses.dataclass(frozen=True)
class TextRun:
    corpus: pathlib.Path
    workdir: pathlib.Path
    env: dict  # the environment of its process, with the persistent compilation cache it filled
    stdout: str


def make_text_run(tmp_path) -> TextRun:
    """An uninterrupted run of ``STEPS`` steps in a separate process (the test process runs with float64
    enabled), so a later run in the same environment computes the same losses bit for bit. Later
    processes compile the same programs: the persistent compilation cache it fills makes them load
    them instead (suite time; the executables, and so the losses, are the same)."""
    corpus = _corpus(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    result = subprocess.run(_command(corpus, STEPS, tmp_path / "run"), env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return TextRun(corpus, tmp_path / "run", env, result.stdout)


@pytest.mark.xdist_group("text_run")
def test_a_run_writes_metrics_checkpoints_config_and_a_sample(text_run):
    work = text_run.workdir
    run = parse([CONFIG_DIR / "base.gin"], _params(text_run.corpus, STEPS))
    assert (work / "config.gin").read_text() == run.operative
    losses = _losses(work)
    assert sorted(losses) == list(range(1, STEPS + 1)) and losses[STEPS] < losses[1]
    rows = _rows(work)
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert sorted(val) == [4, 8, STEPS] and all(np.isfinite(v) for v in val.values())
    samples = [r["text"] for r in rows if r.get("tag") == "sample"]
    assert len(samples) == 1 and samples[0].startswith("to be") and f"sample:\n{samples[0]}" in text_run.stdout
    assert sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())[-1] == STEPS
    assert any((work / "tensorboard").iterdir())


@pytest.mark.xdist_group("text_run")
def test_kill_and_restart_reproduces_the_uninterrupted_losses(text_run, tmp_path):
    """The killed and the resumed run are separate processes in the reference run's environment."""
    want = _losses(text_run.workdir)
    work = tmp_path / "killed"
    cmd = _command(text_run.corpus, STEPS, work)
    proc = subprocess.Popen(cmd, env=text_run.env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (work / "metrics.jsonl").exists() and max(_losses(work), default=0) >= 5:
            proc.send_signal(signal.SIGKILL)  # mid-run, possibly mid-save
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    killed_at = max(_losses(work))
    assert killed_at < STEPS

    result = subprocess.run(cmd, env=text_run.env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from step" in result.stdout
    got = _losses(work)
    assert max(got) == STEPS
    for step in range(killed_at + 1, STEPS + 1):  # bit-exact
        assert got[step] == want[step], (step, got[step], want[step])
