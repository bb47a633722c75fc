"""Where a decode step's time goes: trace ``--steps`` calls of the library's decode step
(``ModelSteps.decode``) with ``jax.profiler`` and sum the device kernels by name.

    python benchmarks/profile_decode.py --preset scaling_653m --variant hybrid --context 131072 --batch 1 \\
        --hlo /tmp/hlo.txt --out benchmarks/results/profile_decode_<gpu>.jsonl

Prints wall time per step, device-busy time per step (the sum of kernel durations), the number of
kernels per step, the top kernels by time (with ``--hlo``, each named by its JAX op) and the idle
device time by the kernel it preceded (which launches the stream waited for); ``--out``
appends the same as one JSON line. A step whose wall time is far
above its busy time is launch- or host-bound; a busy time far above the memory-bound time (bytes read
/ HBM bandwidth) names the kernels to fix.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from kda_jax.inference import cache_slots, empty_cache  # noqa: E402
from kda_jax.inference.generator import ModelSteps  # noqa: E402
from kda_jax.models import HybridDecoder, get_config, variant  # noqa: E402


def device_events(xplane_path):
    """(name, duration ns, idle ns before it) of every event on the device planes (``/device:GPU:*``;
    on a CPU-only machine the host's XLA ops, so the script can be tried anywhere). The idle time is
    the gap since the previous event of the same line ended (a stream waiting for the host)."""
    data = jax.profiler.ProfileData.from_file(xplane_path)
    planes = [p for p in data.planes if p.name.startswith("/device:")]
    if not planes:
        planes = [p for p in data.planes if p.name.startswith("/host:CPU")]
    out = []
    for plane in planes:
        for line in plane.lines:
            if plane.name.startswith("/device:") and "stream" not in line.name.lower():
                continue  # keep the per-stream kernel lines, not the derived XLA-op/module lines
            prev_end = None
            for ev in sorted(line.events, key=lambda e: e.start_ns):
                idle = 0 if prev_end is None else max(0, ev.start_ns - prev_end)
                out.append((ev.name, ev.duration_ns, idle))
                end = ev.start_ns + ev.duration_ns
                prev_end = end if prev_end is None else max(prev_end, end)
    return out


def hlo_op_names(text):
    """{kernel name as the profiler spells it: the op's JAX name} from optimized HLO text: each
    instruction's ``op_name`` metadata, keyed by its name with '.' → '_' (``input_reduce_fusion.40``
    is the trace's ``input_reduce_fusion_40``); instructions XLA inserted itself (no ``op_name``, e.g.
    a pad) are named by their result type."""
    out = {}
    for m in re.finditer(r'^\s*%?([\w.\-]+) = (\S+) (.*)$', text, re.M):
        op = re.search(r'op_name="([^"]*)"', m.group(3))
        out[m.group(1).replace(".", "_")] = (op.group(1).removeprefix("jit(_decode)/") if op
                                             else f"{m.group(2)} (inserted by XLA)")
    return out


def profile(args):
    base = get_config(args.preset, dtype=args.dtype, param_dtype=args.dtype)
    config = base if args.variant == "hybrid" else variant(base, args.variant)
    steps = ModelSteps(HybridDecoder(config, rngs=nnx.Rngs(0)))
    cache = empty_cache(config, args.batch, cache_slots(args.context + 2 * args.steps + args.warmup + 1), pos=args.context)
    tok = jnp.zeros((args.batch, 1), jnp.int32)
    for _ in range(args.warmup):
        logits, cache = steps.decode(steps.leaves, tok, cache)
    jax.block_until_ready(logits)
    ops = {}
    if args.hlo:  # the optimized HLO, to map the profile's fusion names to the model's ops
        text = steps.decode.lower(steps.leaves, tok, cache).compile().as_text()
        with open(args.hlo, "w") as f:
            f.write(text)
        ops = hlo_op_names(text)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        logits, cache = steps.decode(steps.leaves, tok, cache)
    jax.block_until_ready(logits)
    wall = (time.perf_counter() - t0) / args.steps
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(args.steps):
                logits, cache = steps.decode(steps.leaves, tok, cache)
            jax.block_until_ready(logits)
        (path,) = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        events = device_events(path)
    by_name = collections.defaultdict(lambda: [0, 0, 0])
    for name, ns, idle in events:
        by_name[name][0] += 1
        by_name[name][1] += ns
        by_name[name][2] += idle
    busy = sum(ns for _, ns, _ in events) / args.steps
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[: args.top]
    waits = sorted(by_name.items(), key=lambda kv: -kv[1][2])[:10]
    return {"gpu": jax.devices()[0].device_kind, "preset": args.preset, "variant": args.variant,
            "context": args.context, "batch": args.batch, "wall_ms_per_step": 1e3 * wall,
            "busy_ms_per_step": busy / 1e6, "kernels_per_step": len(events) / args.steps,
            "top": [{"name": n[:160], "op": ops.get(n, ""), "calls_per_step": c / args.steps,
                     "ms_per_step": ns / args.steps / 1e6}
                    for n, (c, ns, _) in top],
            # idle device time (the stream waiting) summed by the kernel that ran after it; the
            # traced steps run back to back, so the gap before each step's first kernel counts too
            "idle_ms_per_step": sum(i for _, _, i in events) / args.steps / 1e6,
            "idle_before": [{"name": n[:160], "op": ops.get(n, ""), "calls_per_step": c / args.steps,
                             "idle_ms_per_step": i / args.steps / 1e6} for n, (c, _, i) in waits if i]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--variant", default="hybrid", help="hybrid or a variant name (mla_only, gdn_hybrid, ...)")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=None, help="append the record as one JSON line")
    ap.add_argument("--hlo", default=None, help="write the step's optimized HLO text here")
    args = ap.parse_args()
    rec = profile(args)
    print(f"{rec['gpu']} {rec['variant']} ctx {rec['context']} batch {rec['batch']}: wall {rec['wall_ms_per_step']:.3f} ms,"
          f" device busy {rec['busy_ms_per_step']:.3f} ms, {rec['kernels_per_step']:.0f} kernels per step")
    for t in rec["top"]:
        print(f"  {t['ms_per_step']:8.3f} ms  {t['calls_per_step']:6.1f}x  {t['name'][:60]:60} {t['op'][:70]}")
    print(f"idle {rec['idle_ms_per_step']:.3f} ms per step, before:")
    for t in rec["idle_before"]:
        print(f"  {t['idle_ms_per_step']:8.3f} ms  {t['calls_per_step']:6.1f}x  {t['name'][:60]:60} {t['op'][:70]}")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "a") as f:  # one JSON line per profiled configuration
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
