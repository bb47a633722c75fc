"""Formulations of the decode-sized MoE expert product (N*K <= E, ``moe.gathered_experts``).

15 layers of 653M-sized experts (E=64, D=1216, F=1024, top-7) chained in one jit, bf16, at
N = 1 and 8 tokens. Prints and writes (JSON, argv[1]) per formulation: ms per 15-layer call,
GB/s on the gathered expert bytes, the largest difference to the first formulation relative to
its largest value, and the fusion kinds in XLA's optimized HLO (column-reduction fusions, Triton
GEMMs, cuBLAS calls, gathers). ``one_row_dot`` is the library's code before the 8-row GEMM change;
``pad_m8`` is the XLA form ``gathered_experts`` takes off the GPU kernel's envelope; ``library``
calls ``gathered_experts`` as configured, ``kernel`` with the gathered-expert kernel switched on
(``kda_jax.kernels.gathered``, GPU only). ``PROBE_VARIANTS=a,b`` runs a subset.

    python benchmarks/moe_decode_forms.py benchmarks/results/moe_decode_forms_<gpu>.json
    PROBE_SMALL=1 PROBE_N=1,4 python benchmarks/moe_decode_forms.py /tmp/x.json   # tiny, any machine
"""
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp

from kda_jax import kernels
from kda_jax.layers import moe
from kda_jax.layers.grouped import aligned_layout, grouped_matmul

# experts, width, expert width, top-k, layers (PROBE_SMALL: a tiny stand-in to try the script anywhere)
E, D, F, K, L = (64, 1216, 1024, 7, 15) if not os.environ.get("PROBE_SMALL") else (16, 64, 32, 3, 2)
dt = jnp.bfloat16
mm = dict(preferred_element_type=jnp.float32)


def glu(a, b):
    return (jax.nn.silu(a) * b).astype(dt)


def v_one_row_dot(x, idx, w, w1, w3, w2):
    h1 = jnp.einsum("nd,nkdf->nkf", x.astype(dt), w1[idx], **mm)
    h3 = jnp.einsum("nd,nkdf->nkf", x.astype(dt), w3[idx], **mm)
    out = jnp.einsum("nkf,nkfd->nkd", glu(h1, h3), w2[idx], **mm)
    return jnp.einsum("nkd,nk->nd", out, w)


def v_library(x, idx, w, w1, w3, w2):
    return moe.gathered_experts(x, idx, w, w1, w3, w2, dt)


def v_kernel(x, idx, w, w1, w3, w2):
    old, kernels.GATHERED_AUTO = kernels.GATHERED_AUTO, True  # read while tracing
    try:
        return moe.gathered_experts(x, idx, w, w1, w3, w2, dt)
    finally:
        kernels.GATHERED_AUTO = old


def v_concat13(x, idx, w, w1, w3, w2):
    w13 = jnp.concatenate([w1[idx], w3[idx]], axis=-1)
    h = jnp.einsum("nd,nkdf->nkf", x.astype(dt), w13, **mm)
    out = jnp.einsum("nkf,nkfd->nkd", glu(h[..., :F], h[..., F:]), w2[idx], **mm)
    return jnp.einsum("nkd,nk->nd", out, w)


def split_d(c):
    def f(x, idx, w, w1, w3, w2):
        N = x.shape[0]
        xs = x.astype(dt).reshape(N, c, D // c)
        def up(wE):
            g = wE[idx].reshape(N, K, c, D // c, F)
            return jnp.einsum("ncd,nkcdf->nkcf", xs, g, **mm).sum(2)
        out = jnp.einsum("nkf,nkfd->nkd", glu(up(w1), up(w3)), w2[idx], **mm)
        return jnp.einsum("nkd,nk->nd", out, w)
    return f


def v_unrolled(x, idx, w, w1, w3, w2):
    N = x.shape[0]
    rows = []
    for n in range(N):
        acc = 0.0
        for k in range(K):
            e = idx[n, k]
            xn = x[n:n + 1].astype(dt)
            h1 = jnp.dot(xn, jax.lax.dynamic_index_in_dim(w1, e, keepdims=False), **mm)
            h3 = jnp.dot(xn, jax.lax.dynamic_index_in_dim(w3, e, keepdims=False), **mm)
            o = jnp.dot(glu(h1, h3), jax.lax.dynamic_index_in_dim(w2, e, keepdims=False), **mm)
            acc = acc + o * w[n, k]
        rows.append(acc)
    return jnp.concatenate(rows, 0)


def pad_m(m):
    def f(x, idx, w, w1, w3, w2):
        N = x.shape[0]
        xm = jnp.broadcast_to(x.astype(dt)[:, None, None, :], (N, K, m, D))
        h1 = jnp.einsum("nkmd,nkdf->nkmf", xm, w1[idx], **mm)[:, :, 0]
        h3 = jnp.einsum("nkmd,nkdf->nkmf", xm, w3[idx], **mm)[:, :, 0]
        g = jnp.broadcast_to(glu(h1, h3)[:, :, None, :], (N, K, m, F))
        out = jnp.einsum("nkmf,nkfd->nkmd", g, w2[idx], **mm)[:, :, 0]
        return jnp.einsum("nkd,nk->nd", out, w)
    return f


def v_transposed_x(x, idx, w, w1, w3, w2):
    h1 = jnp.einsum("nkdf,nd->nkf", w1[idx], x.astype(dt), **mm)
    h3 = jnp.einsum("nkdf,nd->nkf", w3[idx], x.astype(dt), **mm)
    out = jnp.einsum("nkf,nkfd->nkd", glu(h1, h3), w2[idx], **mm)
    return jnp.einsum("nkd,nk->nd", out, w)


def v_grouped8(x, idx, w, w1, w3, w2):
    N = x.shape[0]
    group = idx.reshape(-1).astype(jnp.int32)
    layout = aligned_layout(group, E, 8)
    xp = jnp.concatenate([x.astype(dt), jnp.zeros((1, D), dt)])
    xs = xp[jnp.minimum(layout.src_L // K, N)]
    kw = dict(sizes_E=layout.sizes_E, block_expert=layout.block_expert)
    h1 = grouped_matmul(xs, w1, **kw)
    h3 = grouped_matmul(xs, w3, **kw)
    out = grouped_matmul(glu(h1, h3), w2, **kw)
    outM = jnp.take(out, layout.dest_M, axis=0, mode="fill", fill_value=0.0)
    return jnp.einsum("nkd,nk->nd", outM.reshape(N, K, -1), w)


def v_ragged(x, idx, w, w1, w3, w2):
    N = x.shape[0]
    flat = idx.reshape(-1)
    order = jnp.argsort(flat)
    xs = x.astype(dt)[order // K]
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    h1 = jax.lax.ragged_dot(xs, w1, sizes, preferred_element_type=jnp.float32)
    h3 = jax.lax.ragged_dot(xs, w3, sizes, preferred_element_type=jnp.float32)
    o = jax.lax.ragged_dot(glu(h1, h3), w2, sizes, preferred_element_type=jnp.float32)
    out = jnp.zeros_like(o).at[order].set(o)
    return jnp.einsum("nkd,nk->nd", out.reshape(N, K, D), w)


VARIANTS = {"one_row_dot": v_one_row_dot, "library": v_library, "concat13": v_concat13, "split_d4": split_d(4), "split_d16": split_d(16),
            "split_d64": split_d(64), "unrolled": v_unrolled, "pad_m8": pad_m(8), "pad_m16": pad_m(16),
            "transposed_x": v_transposed_x, "grouped8": v_grouped8, "ragged": v_ragged, "kernel": v_kernel}
if os.environ.get("PROBE_VARIANTS"):
    VARIANTS = {n: VARIANTS[n] for n in os.environ["PROBE_VARIANTS"].split(",")}


def chain(fn):
    def run(x, idx_L, w_L, W1, W3, W2):
        acc = jnp.zeros(x.shape, jnp.float32)
        for l in range(L):
            o = fn(x, idx_L[l], w_L[l], W1[l], W3[l], W2[l]).astype(jnp.float32)
            acc = acc + o
            x = x + (o * 1e-3).astype(x.dtype)
        return acc
    return jax.jit(run)


def kinds(text):
    return {"reduce_fusions": len(re.findall(r"kind=kInput", text)),
            "triton_gemm": len(re.findall(r'"__triton_gemm"|kind":"__triton_gemm', text)),
            "cublas": len(re.findall(r'__cublas\$', text)) + len(re.findall(r'custom_call_target="__cublas', text)),
            "gather": len(re.findall(r" gather\(", text)), "copy": len(re.findall(r" copy\(", text))}


def main(out_path):
    key = jax.random.key(0)
    ks = jax.random.split(key, 6)
    W1 = (jax.random.normal(ks[0], (L, E, D, F), jnp.float32) * D ** -0.5).astype(dt)
    W3 = (jax.random.normal(ks[1], (L, E, D, F), jnp.float32) * D ** -0.5).astype(dt)
    W2 = (jax.random.normal(ks[2], (L, E, F, D), jnp.float32) * F ** -0.5).astype(dt)
    res = {"gpu": jax.devices()[0].device_kind, "shape": dict(E=E, D=D, F=F, K=K, layers=L), "runs": []}
    for N in [int(n) for n in os.environ.get("PROBE_N", "1,8").split(",")]:
        x = jax.random.normal(ks[3], (N, D), jnp.float32).astype(dt)
        idx = jnp.stack([jnp.stack([jax.random.choice(jax.random.fold_in(ks[4], 100 * l + n), E, (K,), replace=False)
                                    for n in range(N)]) for l in range(L)]).astype(jnp.int32)
        w = jax.nn.softmax(jax.random.normal(ks[5], (L, N, K)), -1)
        gbytes = L * N * K * 3 * D * F * 2 / 1e9
        ref = None
        for name, fn in VARIANTS.items():
            try:
                f = chain(fn)
                y = f(x, idx, w, W1, W3, W2).block_until_ready()
                for _ in range(3):
                    f(x, idx, w, W1, W3, W2).block_until_ready()
                t0 = time.perf_counter()
                n_it = 50
                for _ in range(n_it):
                    y = f(x, idx, w, W1, W3, W2)
                y.block_until_ready()
                ms = (time.perf_counter() - t0) / n_it * 1e3
                y32 = y.astype(jnp.float32)
                if ref is None:
                    ref = y32
                err = float(jnp.max(jnp.abs(y32 - ref)) / jnp.max(jnp.abs(ref)))
                kd = kinds(f.lower(x, idx, w, W1, W3, W2).compile().as_text())
                rec = dict(N=N, variant=name, ms=ms, gbps=gbytes / ms * 1e3, rel_err=err, **kd)
            except Exception as e:  # noqa: BLE001
                rec = dict(N=N, variant=name, error=f"{type(e).__name__}: {str(e)[:300]}")
            print(rec, flush=True)
            res["runs"].append(rec)
    with open(out_path, "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
