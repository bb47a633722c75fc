"""Where the pure-JAX chunked KDA spends its time: each stage jitted and timed alone (GPU).

    PYTHONPATH=. python benchmarks/kda_chunked_breakdown.py [--shape mid]

A development aid for kda_jax/ops/chunked.py; prints one line per stage (median ms).
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kda_kernels import SHAPES, make_inputs, time_jax  # noqa: E402

from kda_jax.ops import chunked as ck  # noqa: E402


def t(fn, *a, iters=10):
    return time_jax(jax.jit(fn), a, iters, warmup=1)[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="mid")
    B, T = SHAPES[ap.parse_args().shape]
    x = make_inputs(B, T)
    C = 64
    to = lambda n, dt: ck._to_chunks(jnp.asarray(x[n], dt), C)
    q, k, v = (to(n, jnp.bfloat16) for n in "qkv")
    g = to("g", jnp.float32)
    beta = ck._to_chunks(jnp.asarray(x["beta"], jnp.bfloat16)[..., None], C)[..., 0]
    do = to("do", jnp.bfloat16)
    HV = q.shape[2]
    h0 = jnp.zeros((B, HV, 128, 128), jnp.float32)
    s = 128**-0.5
    rows = {}
    rows["core fwd"] = t(lambda *a: ck._core(*a, None, s), q, k, v, g, beta, h0)
    rows["core fwd+bwd"] = t(jax.grad(lambda *a: jnp.sum(ck._core(*a, None, s)[0].astype(jnp.float32) * do),
                                      argnums=range(6)), q, k, v, g, beta, h0)

    def prep(q, k, v, g, beta):
        return ck._prepare(q, k, v, g, beta, None)

    qf, kf, vf, bf, G, zones = prep(q, k, v, g, beta)
    rows["gating.lower (1x)"] = t(lambda qf, kf, G: ck._Gating(G).lower(qf[None], kf), qf, kf, G)
    rows["intra (Aqk, L, inverse)"] = t(lambda qf, kf, bf, G: ck._intra(qf, kf, bf, ck._Gating(G), zones, s), qf, kf, bf, G)
    Aqk, Tm = jax.jit(lambda qf, kf, bf, G: ck._intra(qf, kf, bf, ck._Gating(G), zones, s))(qf, kf, bf, G)
    L = jnp.tril(Aqk, -1)
    rows["inverse"] = t(ck._unit_lower_inverse, L)
    rows["wy"] = t(lambda kf, vf, bf, G, Tm: ck._wy(kf, vf, bf, G, Tm, zones), kf, vf, bf, G, Tm)
    f = jax.jit(lambda kf, vf, bf, G, Tm: ck._wy(kf, vf, bf, G, Tm, zones))(kf, vf, bf, G, Tm)
    rows["state scan"] = t(ck._state_scan, f["W"], f["U"], f["Kd"], f["gend"], h0)
    dM = jnp.tril(Aqk)
    rows["row_adjoint (1x)"] = t(lambda dM, kf, G: ck._Gating(G).row_adjoint(dM[None], kf), dM, kf, G)
    rows["col_adjoint (1x)"] = t(lambda dM, qf, G: ck._Gating(G).col_adjoint(dM[None], qf[None]), dM, qf, G)
    rows["elementwise pass [C,K] f32"] = t(lambda a, b: a * b + 1.0, qf, kf)
    for n, ms in rows.items():
        print(f"{n:32s} {ms:8.3f} ms")


if __name__ == "__main__":
    main()
