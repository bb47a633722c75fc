"""Where a KDA implementation's time goes: trace its forward and forward+backward at one of the
standard shapes (``kda_kernels.SHAPES``) with ``jax.profiler`` and sum the device kernels by name,
each named by the JAX op it came from (optimized HLO metadata).

    python benchmarks/profile_kda.py --impl mosaic --shape mid --out benchmarks/results/profile_kda_<gpu>.jsonl

Prints, per pass, the device-busy time per call and the top kernels; ``--out`` appends one JSON line
per pass. A development aid for the kernels of ``kda_jax.kernels`` (benchmarks/NOTES.md).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kda_kernels import SHAPES, make_inputs  # noqa: E402
from profile_decode import device_events, hlo_op_names  # noqa: E402

from kda_jax.ops import kda  # noqa: E402


def passes(impl, x):
    args = tuple(jnp.asarray(x[n], jnp.bfloat16 if n in ("q", "k", "v", "beta") else jnp.float32)
                 for n in ("q", "k", "v", "g", "beta"))
    do = jnp.asarray(x["do"], jnp.bfloat16)
    f = lambda *a: kda(*a, impl=impl)[0]
    loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32) * do)
    return args, {"fwd": jax.jit(f), "fwdbwd": jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))}


def fusion_body(text, kernel, max_lines=30):
    """The HLO of the fusion the profiler names ``kernel``: its instruction and the computation it calls."""
    for m in re.finditer(r'^\s*%?([\w.\-]+) = (.*calls=%?([\w.\-]+).*)$', text, re.M):
        if m.group(1).replace(".", "_") == kernel:
            body = re.search(r'^%?' + re.escape(m.group(3)) + r' .*?\n}', text, re.M | re.S)
            lines = [m.group(2)[:300]] + (body.group(0).splitlines()[1:max_lines] if body else [])
            return "\n".join("    " + ln.strip()[:240] for ln in lines)
    return ""


def profile(fn, args, calls, top, bodies=0, hlo=None):
    text = fn.lower(*args).compile().as_text()
    if hlo:
        with open(hlo, "w") as f:
            f.write(text)
    ops = hlo_op_names(text)
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(calls):
                out = fn(*args)
            jax.block_until_ready(out)
        (path,) = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        events = device_events(path)
    by_name = collections.defaultdict(lambda: [0, 0])
    for name, ns, _ in events:
        by_name[name][0] += 1
        by_name[name][1] += ns
    busy = sum(ns for _, ns, _ in events) / calls / 1e6
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    for n, _ in rows[:bodies]:
        print(f"-- {n}\n{fusion_body(text, n)}")
    return {"busy_ms": busy, "kernels_per_call": len(events) / calls,
            "top": [{"name": n[:120], "op": ops.get(n, "")[:200], "calls": c / calls, "ms": ns / calls / 1e6}
                    for n, (c, ns) in rows]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", default="mosaic")
    ap.add_argument("--shape", default="mid", choices=sorted(SHAPES))
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--bodies", type=int, default=0, help="print the HLO of the top N fusions")
    ap.add_argument("--out")
    ap.add_argument("--hlo", metavar="PREFIX", help="also write each pass's optimized HLO to PREFIX_<pass>.txt")
    ap.add_argument("--switch", action="append", default=[], metavar="NAME=0|1",
                    help="set a kernels.kda switch (e.g. FACTORS_KERNEL=1) for this run; repeatable")
    a = ap.parse_args()
    switches = {}
    for s in a.switch:
        import kda_jax.kernels.kda as kk

        name, _, val = s.partition("=")
        if not isinstance(getattr(kk, name, None), bool) or val not in ("0", "1"):
            ap.error(f"--switch {s}: not NAME=0|1 for a boolean switch of kda_jax.kernels.kda")
        setattr(kk, name, val == "1")
        switches[name] = val == "1"
    args, fns = passes(a.impl, make_inputs(*SHAPES[a.shape]))
    for name, fn in fns.items():
        r = {"gpu": jax.devices()[0].device_kind, "impl": a.impl, "shape": a.shape, "pass": name,
             "sha": os.environ.get("KDA_JAX_SHA", ""), "switches": switches, **profile(fn, args, a.calls, a.top, a.bodies,
                                                                             a.hlo and f"{a.hlo}_{name}.txt")}
        print(f"\n== {a.impl} {a.shape} {name}: {r['busy_ms']:.3f} ms busy, {r['kernels_per_call']:.0f} kernels per call")
        for t in r["top"]:
            print(f"{t['ms']:8.3f} ms {t['calls']:5.1f}x  {t['name'][:40]:40s} {t['op'][-110:]}")
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
