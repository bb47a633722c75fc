"""The paper's synthetic-task comparison (§5.1, Fig. 4): KDA vs GDN vs the scalar-decay, no-delta
(Mamba2-like) mixer on MQAR / palindrome / stack, over sequence lengths and learning rates.

Every run is a real training run (``kda_jax.train.loop.train``) of
``configs/experiments/synthetic/<task>.gin`` — 2 layers, 2 heads × 128, no MLA, fresh examples every
step — with the mixer chosen by ``ModelSpec.variant`` (None = KDA, ``gdn_hybrid``, ``mamba2_hybrid``),
evaluated on held-out examples every ``--eval_every`` steps. The result file holds, per run, the
accuracy curve (token accuracy and exact match against step) and the peak; ``--plot`` draws one panel
per (task, length) with a curve per mixer (the best learning rate of each, as the paper reports).

    python benchmarks/synthetic_tasks.py --tasks mqar,palindrome --lengths 512,1024 \\
        --mixers kda,gdn,mamba2 --lrs 1e-3 --steps 1500 --out benchmarks/results/synthetic_<gpu>.json
    python benchmarks/synthetic_tasks.py --plot benchmarks/results/synthetic_<gpu>.json

``--budget_s`` stops starting new runs when the time is spent (the JSON is written after every run).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import tempfile
import time

MIXERS = {"kda": None, "gdn": "gdn_hybrid", "mamba2": "mamba2_hybrid"}


def run_one(task, length, mixer, lr, seed, args, workdir):
    from kda_jax.train.config import CONFIG_DIR, parse
    from kda_jax.train.loop import train
    from kda_jax.train.metrics import read_metrics

    params = [f"SyntheticConfig.seq_len = {length}", f"SyntheticConfig.batch_size = {args.batch}",
              f"OptimConfig.learning_rate = {lr}", f"TrainConfig.steps = {args.steps}",
              f"TrainConfig.eval_every = {args.eval_every}", f"TrainConfig.log_every = {args.eval_every}",
              f"TrainConfig.eval_batches = {args.eval_batches}", f"TrainConfig.checkpoint_every = {args.steps}",
              "TrainConfig.keep_checkpoints = 1", f"TrainConfig.seed = {seed}", f"SyntheticConfig.seed = {seed}"]
    if MIXERS[mixer]:
        params.append(f"ModelSpec.variant = '{MIXERS[mixer]}'")
    run = parse([CONFIG_DIR / "experiments" / "synthetic" / f"{task}.gin"], params + args.gin_param)
    if args.kda_impl:  # e.g. "chunked": the pure-JAX path instead of the GPU kernel (an A/B of the two)
        run = dataclasses.replace(run, model=run.model.replace(kda_impl=args.kda_impl))
    t0 = time.perf_counter()
    train(run, workdir, progress=False)
    rows = [r for r in read_metrics(workdir) if "val_token_accuracy" in r]
    curve = [{"step": r["step"], "token_accuracy": r["val_token_accuracy"], "exact_match": r["val_exact_match"],
              "val_loss": r["val_loss"]} for r in rows]
    return {"task": task, "seq_len": length, "mixer": mixer, "lr": lr, "seed": seed, "steps": args.steps, "batch": args.batch,
            "kda_impl": run.model.kda_impl,
            "wall_s": time.perf_counter() - t0, "curve": curve,
            "peak_token_accuracy": max((c["token_accuracy"] for c in curve), default=None),
            "peak_exact_match": max((c["exact_match"] for c in curve), default=None)}


def plot(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.load(open(path))
    panels = sorted({(r["task"], r["seq_len"]) for r in result["runs"] if "curve" in r})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (task, length) in zip(axes[0], panels):
        runs = [r for r in result["runs"] if r["task"] == task and r["seq_len"] == length and "curve" in r]
        for mixer in MIXERS:
            mine = [r for r in runs if r["mixer"] == mixer]
            if not mine:
                continue
            # the learning rate with the best median peak over seeds; one curve per seed
            def median_peak(lr):
                return statistics.median(r["peak_token_accuracy"] or 0.0 for r in mine if r["lr"] == lr)
            lr = max({r["lr"] for r in mine}, key=median_peak)
            seeds = [r for r in mine if r["lr"] == lr]
            color = None
            for i, r in enumerate(seeds):
                (line,) = ax.plot([c["step"] for c in r["curve"]], [100 * c["token_accuracy"] for c in r["curve"]],
                                  "o-", ms=3, color=color, alpha=1.0 if len(seeds) == 1 else 0.7,
                                  label=f"{mixer} (lr {lr:g}, {len(seeds)} seed{'s' * (len(seeds) > 1)})" if i == 0 else None)
                color = line.get_color()
        ax.set_title(f"{task}, length {length}")
        ax.set_xlabel("training step")
        ax.set_ylabel("answer token accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"synthetic tasks on {result['device']}")
    fig.tight_layout()
    png = os.path.splitext(path)[0] + ".png"
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="mqar,palindrome")
    ap.add_argument("--lengths", default="512,1024")
    ap.add_argument("--mixers", default="kda,gdn,mamba2")
    ap.add_argument("--lrs", default="1e-3", help="the paper's grid: 5e-5,1e-4,5e-4,1e-3")
    ap.add_argument("--seeds", default="0", help="comma-separated: each run once per seed (model init and data)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--eval_every", type=int, default=100)
    ap.add_argument("--eval_batches", type=int, default=2)
    ap.add_argument("--gin_param", action="append", default=[], help="extra bindings for every run")
    ap.add_argument("--kda_impl", default=None, help="ModelConfig.kda_impl for every run (default: the config's, auto)")
    ap.add_argument("--budget_s", type=float, default=None, help="start no run after this many seconds")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, help="draw the PNG of a result file and exit")
    args = ap.parse_args()
    if args.plot:
        return plot(args.plot)
    import jax

    device = jax.devices()[0].device_kind
    out = args.out or f"benchmarks/results/synthetic_{device.replace(' ', '_')}.json"
    sha = os.environ.get("KDA_JAX_SHA") or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                                          capture_output=True, text=True).stdout.strip()
    result = {"device": device, "commit": sha, "jax": jax.__version__, "args": vars(args),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "runs": []}
    start = time.perf_counter()
    grid = [(t, int(n), m, float(lr), int(seed)) for n in args.lengths.split(",") for t in args.tasks.split(",")
            for seed in args.seeds.split(",") for m in args.mixers.split(",") for lr in args.lrs.split(",")]
    for task, length, mixer, lr, seed in grid:
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            result.setdefault("skipped", []).append([task, length, mixer, lr, seed])
            continue
        with tempfile.TemporaryDirectory() as wd:
            try:
                rec = run_one(task, length, mixer, lr, seed, args, wd)
            except Exception as e:  # record and go on with the other runs
                rec = {"task": task, "seq_len": length, "mixer": mixer, "lr": lr, "seed": seed,
                       "error": f"{type(e).__name__}: {e}"}
        result["runs"].append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "curve"}), flush=True)
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
    print(f"wrote {out}")
    if any("curve" in r for r in result["runs"]):
        plot(out)


if __name__ == "__main__":
    main()
