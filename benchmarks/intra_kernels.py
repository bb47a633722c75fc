"""The diagonal-block kernels of ``kda_jax.kernels.intra`` alone: their time with and without
ex2.approx and at several unrollings of the adjoint's loop, beside XLA's diagonal blocks (what the
``chunked`` path computes), on one GPU in one run. A development aid for benchmarks/NOTES.md (v3).

    python benchmarks/intra_kernels.py --out benchmarks/results/intra_kernels_<gpu>.json

Inputs: the mid benchmark shape in chunk-major layout (N = 128 chunks, B = 2, H = 16, C = 64,
K = 128), bf16 q, k (unit rows), float32 G = in-chunk cumsum of −softplus(N(0, 1)), random bands.
Median ms of ``--iters`` calls (host clock around each call, after one warm-up call). Every variant's
results are compared with the first one's (max abs difference). ``--interpret`` runs a small shape
on the CPU (a smoke test of the script, no timings worth reading).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kda_jax.kernels import intra
from kda_jax.kernels.kda import bands_to_blocks
from kda_jax.ops import chunked


def inputs(N, B, H, C, K, seed=0):
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q, k = (jnp.asarray(unit(rng.standard_normal((N, B, H, C, K))), jnp.bfloat16) for _ in range(2))
    G = jnp.asarray(np.cumsum(-np.logaddexp(0, rng.standard_normal((N, B, H, C, K))), -2), jnp.float32)
    rows, cols = (jnp.asarray(rng.standard_normal((N, B, H, 2, intra.SUB, C)), jnp.float32) for _ in range(2))
    return q, k, G, rows, cols


def timed(fn, args, iters):
    out = jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts), out


def variant(approx, unroll, interpret):
    """Fresh jits of the two kernels with the module switches set while they trace."""
    def with_switches(f):
        def g(*a):
            saved = intra.APPROX_EXP, intra.ADJOINT_UNROLL
            intra.APPROX_EXP, intra.ADJOINT_UNROLL = approx, unroll
            try:
                return f.__wrapped__(*a, interpret=interpret)
            finally:
                intra.APPROX_EXP, intra.ADJOINT_UNROLL = saved
        return jax.jit(g)
    return with_switches(intra.band_lower), with_switches(intra.band_adjoint)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--interpret", action="store_true")
    ap.add_argument("--out")
    a = ap.parse_args()
    shape = (2, 1, 2, 64, 64) if a.interpret else (128, 2, 16, 64, 128)
    q, k, G, rows, cols = inputs(*shape)
    results, first = [], None
    for approx, unroll in ((True, 1), (False, 1), (True, 3), (True, 5), (True, 15)):
        lower, adjoint = variant(approx, unroll, a.interpret)
        ms_l, band = timed(lower, (q, k, G), a.iters)
        ms_a, adj = timed(adjoint, (q, k, G, rows, cols), a.iters)
        first = first or (band, adj)
        diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip((band, *adj), (first[0], *first[1])))
        results.append(dict(approx_exp=approx, adjoint_unroll=unroll, lower_ms=ms_l, adjoint_ms=ms_a, max_diff=diff))
        print(f"approx={approx!s:5} unroll={unroll:2}: band_lower {ms_l:7.3f} ms, band_adjoint {ms_a:7.3f} ms, "
              f"max |diff| to the first {diff:.1e}", flush=True)
    xla = jax.jit(lambda q, k, G: chunked.SCAN.intra_diag(chunked._Gating(G), q, k))
    ms_x, blocks = timed(xla, (q, k, G), a.iters)
    diff = float(jnp.max(jnp.abs(blocks - bands_to_blocks(first[0]))))
    print(f"XLA diagonal blocks (forward): {ms_x:.3f} ms, max |diff| to the kernel {diff:.1e}")
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(dict(gpu=jax.devices()[0].device_kind, shape=dict(zip("NBHCK", shape)), iters=a.iters,
                           sha=os.environ.get("KDA_JAX_SHA", ""), kernels=results,
                           xla_forward=dict(ms=ms_x, max_diff=diff)), f, indent=1)


if __name__ == "__main__":
    main()
