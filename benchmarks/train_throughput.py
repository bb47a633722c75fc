"""Training throughput and MFU of a model and its ``mla_only`` twin, side by side on the same GPU(s).

For each variant and each device count: build the sharded train step (``kda_jax.train.trainer``)
on a ``data × fsdp`` mesh, run ``--steps`` steps on synthetic full-length rows (one document per
row: throughput does not depend on token values), and report step time, tokens/s, tokens/s per
device, model FLOPs per token (``kda_jax.train.flops``) and MFU against the card's dense bf16 peak,
plus the peak device memory. The first ``--warmup`` steps (compilation) are excluded.

    python benchmarks/train_throughput.py      # kda-jax installed (pip install -e .) --preset scaling_653m --seq 4096 --batch 4 \\
        --devices 1 --out benchmarks/results/train_653m_<gpu>.json

Writes JSON incrementally (one record per variant × device count) and prints a table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import subprocess
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# JAX caps its GPU allocator at 75% of the card by default even without preallocation (59 GiB of an
# H100 80GB): the largest model that fits needs more. CUDA graphs (XLA command buffers) take driver
# memory outside that pool and failed to instantiate on 2×H100 (train_small_2xH100_attempt_*.json).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")
if "xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from kda_jax.models import count_params, get_config, variant  # noqa: E402
from kda_jax.train.config import MeshConfig, OptimConfig, TrainConfig  # noqa: E402
from kda_jax.train.flops import flops_per_token, peak_flops_per_second  # noqa: E402
from kda_jax.train.mesh import batch_sharding, global_batch, make_mesh  # noqa: E402
from kda_jax.train.trainer import Trainer  # noqa: E402


def synthetic_batch(batch, seq, vocab, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
    return {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": np.ones((batch, seq), np.float32),
            "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1))}


def peak_memory(devices):
    stats = [d.memory_stats() or {} for d in devices]
    return max((s.get("peak_bytes_in_use", 0) for s in stats), default=0)


def _gib(x):
    return round(x / 2**30, 3)


def compile_run(config, args, n_devices, rec):
    """Build and compile ahead of time, recording compile times and XLA's memory analysis in ``rec``
    first (so a failed run still says why). Thread-safe: variants may compile concurrently."""
    devices = jax.devices()[:n_devices]
    rec["devices"] = n_devices
    mesh = make_mesh(MeshConfig(data=1, fsdp=n_devices, tensor=1, expert=1), devices)
    optim = OptimConfig(name=args.optimizer, learning_rate=1e-3, warmup_steps=10)
    trainer = Trainer.build(config, optim, TrainConfig(steps=args.steps + args.warmup, microbatches=args.micro), mesh)
    batch = synthetic_batch(args.batch * n_devices, args.seq, config.vocab_size)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        init = trainer.init.lower().compile()
        rec["compile_init_s"] = time.perf_counter() - t0
        abs_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(mesh)) for k, v in batch.items()}
        t0 = time.perf_counter()
        step = trainer.step.lower(trainer.abstract_state, abs_batch).compile()
        rec["compile_step_s"] = time.perf_counter() - t0
    mi, ms = init.memory_analysis(), step.memory_analysis()
    limit = (devices[0].memory_stats() or {}).get("bytes_limit")
    rec["memory_gib"] = {"init_temp": _gib(mi.temp_size_in_bytes), "init_out": _gib(mi.output_size_in_bytes),
                         "step_args": _gib(ms.argument_size_in_bytes), "step_temp": _gib(ms.temp_size_in_bytes),
                         "device_limit": None if limit is None else _gib(limit)}
    print(f"{rec['variant']} x{n_devices}: compiled in {rec['compile_init_s']:.0f} + {rec['compile_step_s']:.0f} s, "
          f"memory (GiB, per device) {rec['memory_gib']}", flush=True)
    need = ms.argument_size_in_bytes + ms.temp_size_in_bytes
    if limit is not None and need > limit:
        raise MemoryError(f"the step needs {need / 2**30:.1f} GiB per device (arguments + temporaries), "
                          f"the device has {limit / 2**30:.1f} GiB")
    return mesh, init, step, batch


def time_run(config, args, compiled, rec):
    """Initialise, run ``args.warmup`` then ``args.steps`` timed steps, and fill ``rec``."""
    mesh, init, step, batch = compiled
    devices, n_devices = list(mesh.devices.flat), rec["devices"]
    with jax.set_mesh(mesh):
        state = init()
        gb = global_batch(batch, mesh)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            state, m = step(state, gb)
        jax.block_until_ready(m)
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, m = step(state, gb)
        jax.block_until_ready(m)
        elapsed = time.perf_counter() - t0
    del state
    tokens = args.batch * n_devices * args.seq
    tps = tokens * args.steps / elapsed
    fl = flops_per_token(config, args.seq)
    peak = peak_flops_per_second(devices[0])
    rec.update({
        "global_batch": args.batch * n_devices, "seq_len": args.seq, "steps": args.steps,
        "step_time_s": elapsed / args.steps, "tokens_per_s": tps, "tokens_per_s_per_device": tps / n_devices,
        "train_flops_per_token": fl["train"], "mfu": None if peak is None else tps * fl["train"] / (peak * n_devices),
        "peak_memory_gib": peak_memory(devices) / 2**30, "warmup_s": warm_s, "final_loss": float(m["loss"]),
    })


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="scaling_653m")
    ap.add_argument("--variants", default="hybrid,mla_only")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4, help="rows per device")
    ap.add_argument("--micro", type=int, default=1, help="micro-batches per step")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--devices", default="1", help="comma-separated device counts, e.g. 1,2")
    ap.add_argument("--optimizer", default="muon")
    ap.add_argument("--remat", default="full")
    ap.add_argument("--param_dtype", default="float32",
                    help="master-parameter dtype (bfloat16 halves parameter, gradient and optimiser memory)")
    ap.add_argument("--moe_dispatch", default="sorted", help="sorted (ragged_dot) | dense (every expert)")
    ap.add_argument("--num_experts", type=int, default=None,
                    help="override the preset's routed experts (same activated size, fewer total parameters)")
    ap.add_argument("--compile_workers", type=int, default=1,
                    help="compile this many runs concurrently before timing any (XLA compiles outside the GIL)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    gpu = jax.devices()[0].device_kind
    out = args.out or f"benchmarks/results/train_{args.preset}_{gpu.replace(' ', '_')}.json"
    sha = os.environ.get("KDA_JAX_SHA") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                                          text=True).stdout.strip()
    overrides = {} if args.num_experts is None else {"num_experts": args.num_experts}
    base = get_config(args.preset, dtype="bfloat16", param_dtype=args.param_dtype, remat=args.remat,
                      moe_dispatch=args.moe_dispatch, **overrides)
    result = {"device": gpu, "device_count": jax.device_count(), "commit": sha, "jax": jax.__version__,
              "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION")},
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "preset": args.preset,
              "args": vars(args), "runs": []}
    runs = []
    for n in (int(x) for x in args.devices.split(",")):  # every variant at one device count, then the next count
        for name in args.variants.split(","):
            config = base if name == "hybrid" else variant(base, name)
            total, active = count_params(config)
            runs.append((config, n, {"variant": name, "devices": n, "params_total": total, "params_activated": active}))

    def save():
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2)

    def guarded(fn, rec, *a):  # record out-of-memory and keep going with the other runs
        try:
            return fn(*a)
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            traceback.print_exc()
            return None

    with concurrent.futures.ThreadPoolExecutor(max(1, args.compile_workers)) as pool:
        futures = [pool.submit(guarded, compile_run, rec, config, args, n, rec) for config, n, rec in runs]
        for (config, n, rec), fut in zip(runs, futures):
            compiled = fut.result()
            if compiled is not None:
                guarded(time_run, rec, config, args, compiled, rec)
                del compiled
            result["runs"].append(rec)
            print(json.dumps(rec), flush=True)
            save()
    print(f"\n{gpu}, {args.preset}, seq {args.seq}, {args.batch} rows/device, remat {args.remat}, "
          f"{args.param_dtype} parameters, MoE dispatch {args.moe_dispatch}")
    print(f"{'variant':10} {'dev':>3} {'step s':>8} {'tok/s':>10} {'tok/s/dev':>10} {'MFU':>6} {'mem GiB':>8}")
    for r in result["runs"]:
        if "error" in r:
            print(f"{r['variant']:10} {r['devices']:>3} {r['error'][:60]}")
        else:
            mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
            print(f"{r['variant']:10} {r['devices']:>3} {r['step_time_s']:8.3f} {r['tokens_per_s']:10.0f} "
                  f"{r['tokens_per_s_per_device']:10.0f} {mfu:>6} {r['peak_memory_gib']:8.1f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
