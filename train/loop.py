"""The training loop: build on the mesh, restore or initialise, step, evaluate, log, checkpoint, sample.

Everything the run needs comes from a ``RunConfig`` (``train.config``). Only this module knows
about meshes, optimisers and checkpoints; the model code takes plain configs.
"""

from __future__ import annotations

import pathlib
import time

import jax
from tqdm.auto import tqdm

from kda_jax.data import eval_batches, tokenizer_for, train_iterator
from kda_jax.data.synthetic import synthetic_eval_batches, synthetic_iterator
from kda_jax.train.checkpoint import Checkpointer
from kda_jax.train.config import RunConfig
from kda_jax.train.flops import flops_per_token, mfu, peak_flops_per_second
from kda_jax.train.mesh import global_batch, make_mesh, maybe_initialize_distributed
from kda_jax.train.metrics import MetricsWriter
from kda_jax.train.trainer import Trainer, sample_text


class NonFiniteLossError(RuntimeError):
    pass


def _data(run: RunConfig):
    """(training iterator, validation batches, tokenizer or None, (global rows, row length)) of the run's
    data source: text (``DataConfig``) or a synthetic task (``SyntheticConfig``)."""
    if run.synthetic is not None:
        s = run.synthetic
        return (synthetic_iterator(s), synthetic_eval_batches(s, run.train.eval_batches), None,
                (s.batch_size, s.seq_len))
    tokenizer = tokenizer_for(run.data)
    if tokenizer.vocab_size > run.model.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{run.model.vocab_size}")
    return (train_iterator(run.data), eval_batches(run.data, max_batches=run.train.eval_batches), tokenizer,
            (run.data.batch_size, run.data.seq_len))


def train(run: RunConfig, workdir, *, progress: bool = True) -> dict:
    """Run (or resume) the training job of ``run`` in ``workdir``; returns the final summary."""
    maybe_initialize_distributed()
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.gin").write_text(run.operative)
    t = run.train
    trainer = Trainer.build(run.model, run.optim, run.train, make_mesh(run.mesh))
    it, val, tokenizer, (batch_size, seq_len) = _data(run)
    shards = trainer.mesh.shape["data"] * trainer.mesh.shape["fsdp"]
    if batch_size % shards:
        raise ValueError(f"the global batch ({batch_size} rows) must be divisible by the mesh's data × fsdp "
                         f"size ({shards}): change the batch size or MeshConfig")
    tokens_per_step = batch_size * seq_len
    flops = flops_per_token(run.model, seq_len)["train"]
    peak = peak_flops_per_second()
    summary: dict = {}
    with Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints, every=t.checkpoint_every,
                      async_save=t.async_checkpoints) as ckpt, MetricsWriter(workdir) as writer:
        state, start, restored = ckpt.restore_or_init(trainer.abstract_state, trainer.init, data_iterator=it)
        if restored:
            print(f"resumed from step {start} in {workdir / 'checkpoints'}")
        bar = tqdm(total=t.steps, initial=start, disable=not progress or jax.process_index() != 0,
                   dynamic_ncols=True, desc="train")
        bad_in_a_row, window_start, window_steps, pending = 0, time.perf_counter(), 0, None
        for step in range(start, t.steps):
            with jax.set_mesh(trainer.mesh):
                batch = global_batch(next(it), trainer.mesh)
                state, metrics = trainer.step(state, batch)
            window_steps += 1
            if pending is not None:  # read the previous step's flag while this one runs
                bad_in_a_row = 0 if float(pending) else bad_in_a_row + 1
            pending = metrics["finite"]
            done = step + 1
            last = done == t.steps
            if last:
                bad_in_a_row = 0 if float(pending) else bad_in_a_row + 1
            if bad_in_a_row >= t.max_bad_steps:
                raise NonFiniteLossError(
                    f"the loss or gradient was not finite for {bad_in_a_row} steps in a row (last: step {done}); "
                    f"updates were skipped and no checkpoint was written since; the last good checkpoint is "
                    f"{ckpt.latest_good_step()} in {workdir / 'checkpoints'}. Lower the learning rate or check the data.")
            if done % t.log_every == 0 or last:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - window_start
                m.update(lr=float(trainer.lr(step)), step_time=elapsed / window_steps,
                         tokens_per_second=tokens_per_step * window_steps / elapsed, bad_steps_in_a_row=bad_in_a_row)
                util = mfu(m["tokens_per_second"], run.model, seq_len, peak)
                m["flops_per_token"] = flops
                if util is not None:
                    m["mfu"] = util
                writer.write(done, m)
                bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_second']:.0f}")
                summary.update(m)
                window_start, window_steps = time.perf_counter(), 0
            if done % t.eval_every == 0 or last:
                ev = trainer.evaluate(state, val, exact_match=run.synthetic is not None)
                writer.write(done, ev)
                summary.update(ev)
                extra = f", exact match {ev['val_exact_match']:.3f}" if "val_exact_match" in ev else ""
                bar.write(f"step {done}: val_loss {ev['val_loss']:.4f} ({ev['val_bits_per_token']:.3f} bits/token), "
                          f"token accuracy {ev['val_token_accuracy']:.3f}{extra}")
            if ckpt.should_save(done) or last:
                ckpt.save(done, state, data_iterator=it, config_str=run.operative, force=last)
            bar.update(1)
        bar.close()
        if t.sample_tokens and tokenizer is not None and state is not None:
            text = sample_text(trainer, state, tokenizer, t.sample_prompt, t.sample_tokens,
                               temperature=t.sample_temperature, seed=t.seed)
            writer.write_text(t.steps, "sample", text)
            summary["sample"] = text
        ckpt.wait()
    summary["step"] = t.steps
    return summary
