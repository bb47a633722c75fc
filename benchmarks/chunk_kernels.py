"""Kernel-alone timings of the chunk-parallel kernels at one standard shape, side by side in one run.

``blocks.gated_blocks`` at each operand-tile width and buffer count it accepts (outputs checked
bitwise equal across them), ``intra.band_lower`` (the part of it that ``INTRA_KERNEL`` alone ran),
``intra.band_adjoint`` and ``wy.forward_factors``; ``gated_blocks_exact`` is the kernel with every
row's diagonal sub-blocks from the exact bands (``factored=False``; the inputs' gates are bounded, so
by default every chunk skips them). Each figure is the best of three rounds of ``--iters`` calls
issued back to back with one wait. Needs a GPU.

    python benchmarks/chunk_kernels.py --shape mid --out benchmarks/results/chunk_kernels_<gpu>.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from kda_kernels import SHAPES, H, K, V  # noqa: E402

from kda_jax.kernels import blocks, intra, wy  # noqa: E402

C = 64


def inputs(B, T, seed=0):
    """Chunk-major operands ``[N, B, H, C, D]`` of the shape (one document per row)."""
    N = T // C
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    shape = (N, B, H, C, K)
    x = dict(q=jnp.asarray(unit(rng.standard_normal(shape)), jnp.bfloat16),
             k=jnp.asarray(unit(rng.standard_normal(shape)), jnp.bfloat16),
             v=jnp.asarray(rng.standard_normal((N, B, H, C, V)), jnp.bfloat16),
             G=jnp.asarray(np.cumsum(-np.logaddexp(0, rng.standard_normal(shape)), -2), jnp.float32),
             beta=jnp.asarray(rng.uniform(0, 1, (N, B, H, C)), jnp.float32),
             zone=jnp.zeros((N, B, C), jnp.float32), ones=jnp.ones((N, B, C), jnp.float32))
    L = np.tril(rng.uniform(-0.3, 0.3, (C, C)), -1)
    x["bands"] = jnp.asarray(rng.standard_normal((N, B, H, 2, 16, C)), jnp.float32)
    x["T"] = jnp.asarray(np.broadcast_to(np.linalg.inv(np.eye(C) + L), (N, B, H, C, C)), jnp.float32)
    return x


def rate(fn, iters):
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            r = fn()
        jax.block_until_ready(r)
        best = min(best, (time.perf_counter() - t0) * 1e3 / iters)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="mid", choices=sorted(SHAPES))
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out")
    a = ap.parse_args()
    if jax.default_backend() != "gpu":
        raise SystemExit("chunk_kernels.py needs a GPU (the kernels are compiled for Hopper)")
    B, T = SHAPES[a.shape]
    x = inputs(B, T)
    s = K ** -0.5
    fns = {"band_lower": lambda: intra.band_lower(x["q"], x["k"], x["G"]),
           "band_adjoint": lambda: intra.band_adjoint(x["q"], x["k"], x["G"], x["bands"], x["bands"])[2]}
    for bd in blocks.OFF_BLOCK_CHOICES:
        for nb in (1, 2):
            fns[f"gated_blocks[block_d={bd},buffers={nb}]"] = (
                lambda bd=bd, nb=nb: blocks.gated_blocks(x["q"], x["k"], x["G"], x["beta"], x["zone"], scale=s,
                                                         buffers=nb, block_d=bd)[0])
    # every row through the exact bands (FACTORED_DIAGONAL off; not bitwise equal to the above)
    fns["gated_blocks_exact"] = lambda: blocks.gated_blocks(x["q"], x["k"], x["G"], x["beta"], x["zone"], scale=s,
                                                            factored=False)[0]
    fns["forward_factors"] = lambda: wy.forward_factors(x["q"], x["k"], x["v"], x["G"], x["beta"], x["T"], x["ones"],
                                                        x["ones"], scale=s)
    first = None
    ms = {}
    for name, fn in fns.items():
        ms[name] = rate(fn, a.iters)
        if name.startswith("gated_blocks["):
            out = np.asarray(fn())
            first = out if first is None else first
            if not np.array_equal(out, first):
                raise SystemExit(f"{name}: Aqk differs from the first gated_blocks variant")
        print(f"{name:40s} {ms[name]:.3f} ms", flush=True)
    gpu = jax.devices()[0].device_kind
    out = a.out or os.path.join(os.path.dirname(__file__), "results",
                                f"chunk_kernels_{a.shape}_{gpu.replace(' ', '_')}.json")
    with open(out, "w") as fh:
        json.dump(dict(benchmark="chunk_kernels", gpu=gpu, sha=os.environ.get("KDA_JAX_SHA"), shape=a.shape,
                       N_B_H_C_K=[T // C, B, H, C, K], iters=a.iters, ms=ms), fh, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
