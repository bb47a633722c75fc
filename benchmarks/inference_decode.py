"""Long-context inference of the hybrid vs its ``mla_only`` twin, side by side on one GPU.

For each variant: prefill time of one sequence at each context (``HybridDecoder.prefill``,
jitted, median of ``--repeats``); decode tokens/s at each context with batch 1 and with the
batch that fills ``--fill_gib`` of cache memory (the same budget for both variants, so the
hybrid's smaller cache buys a larger batch) — 3 warm-up steps, then the median of ``--repeats``
runs of ``--decode_steps`` steps; cache bytes per sequence (``cache_bytes``).
Decode runs on a zero cache of the right shape positioned at the context length
(``empty_cache``): decode cost does not depend on the cached values.

    python benchmarks/inference_decode.py --preset scaling_653m --contexts 4096,32768,131072 \\
        --out benchmarks/results/inference_<gpu>.json
    python benchmarks/inference_decode.py --plot benchmarks/results/inference_<gpu>.json   # PNG beside it

Writes JSON incrementally and prints a table; ``--plot`` draws tokens/s against context.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from kda_jax.inference import cache_bytes, cache_slots, empty_cache  # noqa: E402
from kda_jax.inference.generator import ModelSteps  # noqa: E402
from kda_jax.models import HybridDecoder, count_params, get_config, variant  # noqa: E402


def _median_time(fn, repeats):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure(model, config, ctx, args):
    """One context: the library's jitted steps (``ModelSteps``), so the numbers are what ``Generator``
    users get."""
    rec = {"context": ctx}
    max_len = cache_slots(ctx + args.decode_steps)  # the slots Generator would allocate
    per_seq = cache_bytes(config, max_len, 1)
    rec["cache_bytes_per_seq"] = per_seq
    steps = ModelSteps(model)
    if args.prefill_memory_only:  # compile only: XLA's temporary bytes for this prefill, nothing run
        spec = jax.ShapeDtypeStruct((1, ctx), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32)
        mem = steps.prefill.lower(steps.leaves, *spec, max_len=max_len).compile().memory_analysis()
        rec["prefill_temp_bytes"] = mem.temp_size_in_bytes
        return rec
    if not args.no_prefill:
        toks = jnp.asarray(np.random.default_rng(ctx).integers(0, config.vocab_size, (1, ctx)), jnp.int32)
        n = jnp.asarray([ctx])
        prefill = lambda: steps.prefill(steps.leaves, toks, n, max_len=max_len)[0]
        t0 = time.perf_counter()
        jax.block_until_ready(prefill())
        rec["prefill_compile_s"] = time.perf_counter() - t0
        rec["prefill_s"] = _median_time(prefill, args.repeats)
        rec["prefill_tokens_per_s"] = ctx / rec["prefill_s"]
    fill = int(args.fill_gib * 2**30 // per_seq["total"])
    for label, batch in () if args.no_decode else (("batch1", 1), ("filled", max(fill, 1))):
        try:
            rec[label] = _decode(steps, config, batch, max_len, ctx, args)
        except Exception as e:  # out of memory for the filled batch: keep the batch-1 figure
            rec[label] = {"batch": batch, "error": f"{type(e).__name__}: {str(e)[:400]}"}
            traceback.print_exc()
    return rec


def _decode(steps, config, batch, max_len, ctx, args):
    """Decode tokens/s of ``batch`` sequences positioned at ``ctx`` (a zero cache of the right shape)."""
    cache = empty_cache(config, batch, max_len, pos=ctx)
    tok = jnp.zeros((batch, 1), jnp.int32)
    state = {"cache": cache}

    def run(n):
        for _ in range(n):
            logits, state["cache"] = steps.decode(steps.leaves, tok, state["cache"])
        return logits

    jax.block_until_ready(run(3))  # compile and warm up
    dt = _median_time(lambda: run(args.decode_steps), args.repeats) / args.decode_steps
    return {"batch": batch, "step_s": dt, "tokens_per_s": batch / dt}


def run(args):
    gpu = jax.devices()[0].device_kind
    sha = os.environ.get("KDA_JAX_SHA") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                                          text=True).stdout.strip()
    base = get_config(args.preset, dtype=args.dtype, param_dtype=args.dtype)
    result = {"benchmark": "inference_decode", "gpu": gpu, "commit": sha, "jax": jax.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "args": vars(args), "variants": {}}
    out = args.out or f"benchmarks/results/inference_{args.preset}_{gpu.replace(' ', '_')}.json"
    for name in args.variants.split(","):
        config = base if name == "hybrid" else variant(base, name)
        model = HybridDecoder(config, rngs=nnx.Rngs(0))
        total, active = count_params(config)
        runs = result["variants"].setdefault(name, {"params_total": total, "params_activated": active, "runs": []})
        for ctx in (int(c) for c in args.contexts.split(",")):
            try:
                rec = measure(model, config, ctx, args)
            except Exception as e:  # out of memory at a long context: record it and go on
                rec = {"context": ctx, "error": f"{type(e).__name__}: {str(e)[:400]}"}
                traceback.print_exc()
            runs["runs"].append(rec)
            print(json.dumps({name: rec}), flush=True)
            os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
            with open(out, "w") as f:
                json.dump(result, f, indent=1)
        del model
    table(result)
    print(f"wrote {out}")


def table(result):
    print(f"\n{result['gpu']}, {result['args']['preset']}: decode tokens/s (batch) and prefill s")
    print(f"{'variant':10} {'context':>8} {'prefill s':>10} {'tok/s b=1':>10} {'tok/s filled':>14} {'cache MB/seq':>13}")
    for name, v in result["variants"].items():
        for r in v["runs"]:
            if "error" in r:
                print(f"{name:10} {r['context']:>8} {r['error'][:60]}")
                continue
            if "prefill_temp_bytes" in r:
                print(f"{name:10} {r['context']:>8} prefill temporaries {r['prefill_temp_bytes'] / 2**30:.2f} GiB")
                continue
            pre = f"{r['prefill_s']:.3f}" if "prefill_s" in r else "-"
            if "batch1" not in r:
                print(f"{name:10} {r['context']:>8} {pre:>10}")
                continue
            tps = lambda d: f"{d['tokens_per_s']:.1f}" if "tokens_per_s" in d else "failed"
            print(f"{name:10} {r['context']:>8} {pre:>10} {tps(r['batch1']):>10} "
                  f"{tps(r['filled']):>9} ({r['filled']['batch']:>3}) "
                  f"{r['cache_bytes_per_seq']['total'] / 2**20:13.1f}")


def plot(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.load(open(path))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, label in zip(axes, ("batch1", "filled")):
        for name, v in result["variants"].items():
            runs = [r for r in v["runs"] if "tokens_per_s" in r.get(label, {})]
            ax.plot([r["context"] for r in runs], [r[label]["tokens_per_s"] for r in runs], "o-", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode tokens/s")
        ax.set_title("batch 1" if label == "batch1" else f"batch filling {result['args']['fill_gib']} GiB of cache")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{result['args']['preset']} on {result['gpu']}")
    fig.tight_layout()
    png = os.path.splitext(path)[0] + ".png"
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="scaling_653m")
    ap.add_argument("--variants", default="hybrid,mla_only")
    ap.add_argument("--contexts", default="4096,32768,131072")
    ap.add_argument("--decode_steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fill_gib", type=float, default=40.0, help="cache memory the filled batch may use")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--no_prefill", action="store_true")
    ap.add_argument("--no_decode", action="store_true", help="prefill timings only")
    ap.add_argument("--prefill_memory_only", action="store_true",
                    help="only compile each prefill and record its temporary bytes (no table)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, help="draw the PNG of a result file and exit")
    args = ap.parse_args()
    if args.plot:
        plot(args.plot)
    else:
        run(args)


if __name__ == "__main__":
    main()
