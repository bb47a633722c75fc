"""Value-tile width of the Mosaic state passes: the whole ``kda(..., impl="mosaic")`` op, forward and
forward+backward, at the standard shapes with the passes forced to each width (64, 32, 16 columns
of V per CTA), side by side in one run; plus each width's outputs and gradients against the
64-wide run on the same inputs (relative RMSE), so a faster width that computes something else
shows up here before it reaches a test.

    PYTHONPATH=.site:. python benchmarks/state_tiles.py --shapes mid,long

A narrower tile gives V / bv × heads × batch CTAs instead of V / 64 × …: at the mid shape 64 → 128,
at the long shape 32 → 128, on a 132-SM card (``kernels/state_pass.py: BLOCK_V``, the default width).
Writes ``benchmarks/results/state_tiles_<gpu>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kda_jax.kernels import state_pass  # noqa: E402
from kda_jax.ops import kda  # noqa: E402

from kda_kernels import SHAPES, H, V, make_inputs, rel_rmse, time_jax  # noqa: E402


def run_width(bv, x, iters):
    """Times and results of the op with the state passes forced to ``bv`` columns."""
    saved = state_pass.BLOCK_V
    state_pass.BLOCK_V = bv
    jax.clear_caches()  # the passes read the width while tracing
    try:
        args = tuple(jnp.asarray(x[n], jnp.bfloat16 if n in ("q", "k", "v", "beta") else jnp.float32)
                     for n in ("q", "k", "v", "g", "beta"))
        do = jnp.asarray(x["do"], jnp.bfloat16)
        f = lambda *a: kda(*a, impl="mosaic")[0]
        fwd = jax.jit(f)
        grad = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * do), argnums=(0, 1, 2, 3, 4)))
        results = (np.asarray(fwd(*args).astype(jnp.float32)),
                   *(np.asarray(g.astype(jnp.float32)) for g in grad(*args)))
        times = {p: time_jax(fn, args, iters) for p, fn in (("fwd", fwd), ("fwdbwd", grad))}
        return times, results
    finally:
        state_pass.BLOCK_V = saved
        jax.clear_caches()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="mid,long")
    ap.add_argument("--widths", default="64,32,16")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out")
    args = ap.parse_args()
    gpu = jax.devices()[0].device_kind
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   f"state_tiles_{gpu.replace(' ', '_')}.json")
    rows = []
    for shape in args.shapes.split(","):
        B, T = SHAPES[shape]
        x = make_inputs(B, T)
        base = None
        for bv in (int(w) for w in args.widths.split(",")):
            times, res = run_width(bv, x, args.iters)
            base = base or res
            diff = {n: rel_rmse(a, b) for n, a, b in zip(("o", "dq", "dk", "dv", "dg", "dbeta"), res, base)}
            for p, (ms, ms_min, ms_pipe) in times.items():
                rows.append(dict(shape=shape, B=B, T=T, bv=bv, ctas=(V // bv) * H * B, pass_=p, ms=ms,
                                 ms_min=ms_min, ms_pipelined=ms_pipe, n=args.iters))
            rows[-1]["rel_rmse_vs_first_width"] = diff
            print(f"{shape} bv={bv}: fwd {times['fwd'][0]:.3f} ms, fwd+bwd {times['fwdbwd'][0]:.3f} ms; "
                  f"vs bv={args.widths.split(',')[0]}: " + ", ".join(f"{k} {v:.1e}" for k, v in diff.items()), flush=True)
            with open(out, "w") as fh:
                json.dump(dict(benchmark="state_tiles", gpu=gpu, date=datetime.date.today().isoformat(),
                               kda_jax=os.environ.get("KDA_JAX_SHA", "unknown"), jax=jax.__version__,
                               rows=[{("pass" if k == "pass_" else k): v for k, v in r.items()} for r in rows]),
                          fh, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
