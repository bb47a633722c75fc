"""KDA kernel benchmark: kda-jax vs flash-linear-attention and jax-linear-attention, same GPU, same run.

Shapes (benchmarks.md): H = 16, K = V = 128, bf16 q/k/v/β, float32 log decay g = −softplus(N(0,1)),
q and k L2-normalised; short 8×2048, mid 2×8192, long 1×32768. Forward alone and forward+backward
(gradients of Σ o⊙dO w.r.t. q, k, v, g, β), median of ``--iters`` timed calls after warm-up.

Every row also carries ``floor_ms`` and ``x_floor``: the time to move the bytes a fully fused
implementation must move (benchmarks.md: forward reads q, k, v, g, β and writes o, 1538 B per
token-head; forward+backward also reads dO and writes dq, dk, dv, dg, dβ, 3076 B) at the card's
measured copy bandwidth (``CARDS``: 3.0 TB/s on an H100, 4.3 on an H200), and the measured time as
a multiple of it.

Also records, for the pure-JAX ``chunked`` path, the compiled peak-memory analysis of
forward+backward at B = 1, H = 16, K = V = 128 and T = 8K … 64K (linear in T).

Baselines run only when installed (they are never dependencies of kda-jax). On the GPU machine:

    pip install --no-index --no-deps --target .site .whl/*.whl   # fla 0.6.0, fla-core, jla 0.1.0, ...
    PYTHONPATH=.site:. python benchmarks/kda_ops.py

Writes ``benchmarks/results/kda_kernels_<gpu>.json`` (or ``--out``) and prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with PyTorch
os.environ.setdefault("TRITON_CACHE_DIR", "/tmp/triton_cache")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kda_jax.ops import kda  # noqa: E402

SHAPES = {"short": (8, 2048), "mid": (2, 8192), "long": (1, 32768)}
H, K, V = 16, 128, 128
# Per card (substring of jax's device_kind): nominal HBM peak and measured device-to-device copy
# bandwidth, bytes/s. H100 SXM: 3.35 TB/s nominal, ~3.0 copied (benchmarks.md); H200: 4.8 TB/s
# nominal, ~4.3 copied (the device tool's KINDS.md). The byte floor and the decode fractions use the
# card the run is on, so an H200 row is not flattered by the H100's lower bandwidth.
CARDS = {"H100": (3.35e12, 3.0e12), "H200": (4.8e12, 4.3e12)}


def card_bandwidth(gpu: str) -> tuple[float, float]:
    """(HBM peak, copy bandwidth) in bytes/s for a device_kind; an unknown card raises, naming it."""
    for key, bw in CARDS.items():
        if key in gpu:
            return bw
    raise SystemExit(f"kda_kernels: no bandwidth figures for GPU {gpu!r}; add it to CARDS (nominal peak, measured copy)")


FLOOR_BYTES = {"fwd": 3 * 2 * K + 4 * K + 2 + 2 * V, "fwdbwd": 2 * (3 * 2 * K + 4 * K + 2 + 2 * V)}


def make_inputs(B, T, seed=0):
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(rng.standard_normal((B, T, H, K), np.float32))
    k = unit(rng.standard_normal((B, T, H, K), np.float32))
    v = rng.standard_normal((B, T, H, V), np.float32)
    g = -np.logaddexp(0.0, rng.standard_normal((B, T, H, K), np.float32)).astype(np.float32)
    beta = 1 / (1 + np.exp(-rng.standard_normal((B, T, H), np.float32)))
    do = rng.standard_normal((B, T, H, V), np.float32)
    return dict(q=q, k=k, v=v, g=g, beta=beta.astype(np.float32), do=do)


def time_jax(fn, args, iters, warmup=3):
    """(median, min) ms of lone calls, each waited for (host dispatch included), and ms per call of
    ``iters`` calls issued back to back with one wait (the host dispatches ahead, as in training)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append((time.perf_counter() - t0) * 1e3)
    rates = []
    for _ in range(2):  # the first round warms the allocator for many calls in flight; the second is kept
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        rates.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(ts), min(ts), rates[-1]


def rel_rmse(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b**2)))


# ---------------------------------------------------------------------------------------------
# JAX implementations (ours and jla)


def _chunked_with_unroll(unroll):
    from kda_jax.ops import chunked

    def f(q, k, v, g, beta):  # SCAN_UNROLL is read while tracing, i.e. inside jit
        saved, chunked.SCAN_UNROLL = chunked.SCAN_UNROLL, unroll
        try:
            return kda(q, k, v, g, beta, impl="chunked")[0]
        finally:
            chunked.SCAN_UNROLL = saved
    return f


def _mosaic_with(**switches):
    """The Mosaic path with ``kda_mosaic``'s switches (kernels/kda.py) set for this implementation."""

    def f(q, k, v, g, beta):
        from kda_jax.kernels.kda import kda_mosaic

        return kda_mosaic(q, k, v, g, beta, scale=q.shape[-1] ** -0.5, **switches)[0]
    return f


def jax_impls(unroll_ablation=False):
    impls = {"kda_jax.chunked": lambda q, k, v, g, beta: kda(q, k, v, g, beta, impl="chunked")[0],
             "kda_jax.mosaic": lambda q, k, v, g, beta: kda(q, k, v, g, beta, impl="mosaic")[0],
             # undifferentiated calls form o in the state kernel (FUSED_OUTPUT; fwd+bwd is the plain path's)
             "kda_jax.mosaic[fused_output]": _mosaic_with(fused_output=True),
             # W, U, Kd, Qs by ``wy.forward_factors`` (FACTORS_KERNEL)
             "kda_jax.mosaic[factors_kernel]": _mosaic_with(factors_kernel=True),
             # Aqk and L around ``band_lower`` in XLA (BLOCKS_KERNEL off)
             "kda_jax.mosaic[xla_blocks]": _mosaic_with(blocks_kernel=False),
             # the diagonal sub-blocks in XLA (INTRA_KERNEL off)
             "kda_jax.mosaic[xla_diag]": _mosaic_with(intra_kernel=False),
             # every row's diagonal sub-blocks from the exact bands (FACTORED_DIAGONAL off)
             "kda_jax.mosaic[exact_diagonal]": _mosaic_with(factored_diagonal=False),
             # the backward's diagonal adjoints of every row from the exact bands (FACTORED_ADJOINT off)
             "kda_jax.mosaic[band_adjoint]": _mosaic_with(factored_adjoint=False),
             # G and the gate's gradient by ``cumsum.gate_cumsum`` (CUMSUM_KERNEL)
             "kda_jax.mosaic[cumsum_kernel]": _mosaic_with(cumsum_kernel=True),
             # the XLA GEMMs around the kernels on bf16 operands, or on float32 ones (BF16_OPERANDS)
             "kda_jax.mosaic[bf16_operands]": _mosaic_with(bf16_operands=True),
             "kda_jax.mosaic[f32_operands]": _mosaic_with(bf16_operands=False),
             # the gate floor in XLA before the cumsum kernel, or inside it (GATE_FLOOR_KERNEL)
             "kda_jax.mosaic[xla_gate_floor]": _mosaic_with(gate_floor_kernel=False),
             "kda_jax.mosaic[gate_floor_kernel]": _mosaic_with(gate_floor_kernel=True),
             # T = (I + L)⁻¹ in gated_blocks' epilogue (INVERSE_IN_BLOCKS)
             "kda_jax.mosaic[inverse_in_blocks]": _mosaic_with(inverse_in_blocks=True),
             # the backward through W, U and the inverse by wy.wy_adjoint (WY_ADJOINT_KERNEL)
             "kda_jax.mosaic[wy_adjoint_kernel]": _mosaic_with(wy_adjoint_kernel=True),
             # the backward's parts through the chunk states by inter.inter_adjoint (INTER_ADJOINT_KERNEL)
             "kda_jax.mosaic[inter_adjoint_kernel]": _mosaic_with(inter_adjoint_kernel=True),
             # both backward kernels
             "kda_jax.mosaic[backward_kernels]": _mosaic_with(wy_adjoint_kernel=True, inter_adjoint_kernel=True)}
    if unroll_ablation:
        impls["kda_jax.chunked[unroll=1]"] = _chunked_with_unroll(1)
    try:
        from jla.ops import linear_attention
        import jla.ops.mosaic_gpu  # noqa: F401  (registers the kernels)

        impls["jla.mosaic_gpu"] = lambda q, k, v, g, beta: linear_attention("kda", q, k, v, g=g, beta=beta,
                                                                           impl="mosaic_gpu")[0]
    except Exception as e:  # not installed: skip, say so
        print(f"jla not available ({type(e).__name__}: {e})")
    return impls


def bench_jax(name, f, x, iters):
    args = tuple(jnp.asarray(x[n], jnp.bfloat16 if n in "qkv" or n == "beta" else jnp.float32)
                 for n in ("q", "k", "v", "g", "beta"))
    do = jnp.asarray(x["do"], jnp.bfloat16)
    fwd = jax.jit(f)
    fwdbwd = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * do), argnums=(0, 1, 2, 3, 4)))
    out = np.asarray(fwd(*args).astype(jnp.float32))
    rows = []
    for p, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
        ms, ms_min, ms_pipe = time_jax(fn, args, iters)
        rows.append(dict(impl=name, pass_=p, ms=ms, ms_min=ms_min, ms_pipelined=ms_pipe, n=iters))
    return rows, out


# ---------------------------------------------------------------------------------------------
# flash-linear-attention (PyTorch + Triton)


def fla_impl():
    try:
        import torch
        from fla.ops.kda import chunk_kda
        return torch, chunk_kda
    except Exception as e:
        print(f"fla not available ({type(e).__name__}: {e})")
        return None, None


def bench_fla(torch, chunk_kda, x, iters):
    dev = "cuda"
    t = lambda n, dt: torch.tensor(x[n], device=dev, dtype=dt)
    q, k, v, beta = (t(n, torch.bfloat16) for n in ("q", "k", "v", "beta"))
    g = t("g", torch.float32)
    do = t("do", torch.bfloat16)

    def timed(fn):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(iters):  # back to back, one wait: as ``time_jax``'s pipelined figure
            fn()
        e.record()
        torch.cuda.synchronize()
        return statistics.median(ts), min(ts), s.elapsed_time(e) / iters

    with torch.no_grad():
        out = chunk_kda(q, k, v, g, beta)[0].float().cpu().numpy()
        fwd = timed(lambda: chunk_kda(q, k, v, g, beta))
    leaves = [a.clone().requires_grad_(True) for a in (q, k, v, g, beta)]

    def fwdbwd():
        o, _ = chunk_kda(*leaves)
        o.backward(do)

    bwd = timed(fwdbwd)
    rows = [dict(impl="fla.chunk_kda", pass_=p, ms=t[0], ms_min=t[1], ms_pipelined=t[2], n=iters)
            for p, t in (("fwd", fwd), ("fwdbwd", bwd))]
    return rows, out


# ---------------------------------------------------------------------------------------------
# decode: one (or a few) tokens per call against a donated float32 state

DECODE = dict(B=64, H=32, K=128, V=128)


def decode_rows(iters, hbm_peak):
    """Achieved state bandwidth of ``kda_decode``: the state is read and written once per call
    (2 · B·H·K·V·4 bytes). Two timings: ``ms``, the device's rate in a decode loop (``iters``
    chained calls, the state donated from one to the next, one wait at the end: how a serving loop
    dispatches), from which ``gbps`` and ``frac_hbm_peak``; and ``ms_call``, the median of single
    calls each waited for (adds the host's dispatch, ~0.1 ms). The Mosaic kernel's ring depth and
    CTA count are swept at 1 and 4 tokens (``impl`` ``mosaic[s<stages>,p<CTAs>]``)."""
    from kda_jax.kernels.decode import decode_step
    from kda_jax.ops import kda_decode

    B, Hd, Kd, Vd = DECODE["B"], DECODE["H"], DECODE["K"], DECODE["V"]
    configs = [("xla", None), ("mosaic", None)] + [(f"mosaic[s{st},p{mp}]", (st, mp)) for st, mp in
                                                   ((3, 264), (4, 132), (4, 264))]
    rows = []
    for S in (1, 4, 8):
        rng = np.random.default_rng(S)
        unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
        q, k = (jnp.asarray(unit(rng.standard_normal((B, S, Hd, Kd))), jnp.bfloat16) for _ in range(2))
        v = jnp.asarray(rng.standard_normal((B, S, Hd, Vd)), jnp.bfloat16)
        g = jnp.asarray(-np.logaddexp(0, rng.standard_normal((B, S, Hd, Kd))), jnp.float32)
        beta = jnp.asarray(rng.random((B, S, Hd)), jnp.bfloat16)
        f32 = lambda x: x.astype(jnp.float32)
        for name, cfg in configs if S < 8 else configs[:2]:
            if cfg is None:
                fn = lambda st, impl=name: kda_decode(q, k, v, g, beta, st, impl=impl)
            else:  # the kernel itself at another setting, on the same float32 inputs kda_decode gives it
                fn = lambda st, cfg=cfg: decode_step(f32(q), f32(k), f32(v), g, f32(beta), st, scale=Kd**-0.5,
                                                     stages=cfg[0], max_programs=cfg[1])
            step = jax.jit(fn, donate_argnums=0)
            state = jnp.zeros((B, Hd, Kd, Vd), jnp.float32)
            try:
                for _ in range(3):
                    _, state = step(state)
            except Exception as e:
                print(f"decode {name} S={S} failed: {type(e).__name__}: {str(e)[:300]}")
                continue
            jax.block_until_ready(state)
            ts = []
            for _ in range(iters):
                t0 = time.perf_counter()
                o, state = step(state)
                jax.block_until_ready(state)
                ts.append(time.perf_counter() - t0)
            reps = 5 * iters
            t0 = time.perf_counter()
            for _ in range(reps):
                o, state = step(state)
            jax.block_until_ready(state)
            ms = (time.perf_counter() - t0) / reps * 1e3
            state_bytes = 2 * B * Hd * Kd * Vd * 4
            rows.append(dict(impl=f"kda_jax.decode[{name}]", pass_="decode", shape=f"decode_S{S}", **DECODE, tokens=S,
                             ms=ms, n=reps, ms_call=statistics.median(ts) * 1e3, ms_call_min=min(ts) * 1e3,
                             state_bytes=state_bytes, gbps=state_bytes / (ms * 1e-3) / 1e9,
                             frac_hbm_peak=state_bytes / (ms * 1e-3) / hbm_peak))
    return rows


def memory_rows():
    """Compiled memory of chunked forward+backward at B=1, H=16, K=V=128 (bytes)."""
    rows = []
    f = lambda *a: kda(*a, impl="chunked")[0]
    for T in (16384, 32768):
        shp = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
        args = (shp(1, T, H, K), shp(1, T, H, K), shp(1, T, H, V), shp(1, T, H, K, dt=jnp.float32), shp(1, T, H))
        grad = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3, 4)))
        m = grad.lower(*args).compile().memory_analysis()
        rows.append(dict(T=T, temp_bytes=int(m.temp_size_in_bytes), argument_bytes=int(m.argument_size_in_bytes),
                         output_bytes=int(m.output_size_in_bytes),
                         temp_bytes_per_token_head=m.temp_size_in_bytes / (T * H)))
    return rows


def write(out, gpu, sha, rows, checks, mem):
    versions = {"jax": jax.__version__, "kda_jax": sha}
    for mod, key in (("fla", "fla"), ("jla", "jla"), ("torch", "torch"), ("triton", "triton")):
        try:
            versions[key] = __import__(mod).__version__
        except Exception:
            pass
    hbm_peak, copy_bw = card_bandwidth(gpu)
    result = dict(benchmark="kda_kernels", gpu=gpu, date=datetime.date.today().isoformat(), versions=versions,
                  hbm_peak_tbps=hbm_peak / 1e12, floor_copy_tbps=copy_bw / 1e12, rows=rows, output_agreement=checks, chunked_fwdbwd_memory=mem)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--shapes", default="short,mid,long")
    ap.add_argument("--out", default=None)
    ap.add_argument("--impls", default="", help="comma-separated names (exact) or substrings; run only matching implementations")
    ap.add_argument("--unroll-ablation", action="store_true", help="also time the chunked path without unrolling")
    ap.add_argument("--no-memory", action="store_true", help="skip the compiled-memory rows")
    ap.add_argument("--decode-only", action="store_true", help="only the decode bandwidth rows")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode bandwidth rows")
    args = ap.parse_args()

    gpu = jax.devices()[0].device_kind
    hbm_peak, copy_bw = card_bandwidth(gpu)
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   f"kda_kernels_{gpu.replace(' ', '_').replace('/', '_')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    sha = os.environ.get("KDA_JAX_SHA")  # a copy of the tree on a GPU machine: its .git may be stale
    if not sha:
        try:
            sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                          stderr=subprocess.DEVNULL).strip()
        except Exception:
            sha = "unknown"
    tokens = [t for t in args.impls.split(",") if t]
    all_impls = jax_impls(args.unroll_ablation)
    known = set(all_impls) | {"fla.chunk_kda"}
    # a token that names an implementation selects just it; any other token, every name containing it
    keep = lambda n: not tokens or any(t == n if t in known else t in n for t in tokens)
    impls = {n: f for n, f in all_impls.items() if keep(n)}
    torch, chunk_kda = fla_impl() if keep("fla.chunk_kda") else (None, None)
    rows, checks = [], []
    for r in ([] if args.no_decode else decode_rows(args.iters, hbm_peak)):
        r["pass"] = r.pop("pass_")
        rows.append(r)
        print(f"{r['impl']} S={r['tokens']}: {r['ms']:.3f} ms per call in a loop, {r['gbps']:.0f} GB/s of state "
              f"traffic ({100 * r['frac_hbm_peak']:.0f}% of {hbm_peak / 1e12:.2f} TB/s); {r['ms_call']:.3f} ms a lone call",
              flush=True)
    write(out, gpu, sha, rows, checks, [])
    # name -> (inputs, iters) -> (rows, output)
    benches = {n: (lambda x, iters, n=n, f=f: bench_jax(n, f, x, iters)) for n, f in impls.items()}
    if torch is not None:
        benches["fla.chunk_kda"] = lambda x, iters: bench_fla(torch, chunk_kda, x, iters)
    for shape in ([] if args.decode_only else args.shapes.split(",")):
        B, T = SHAPES[shape]
        x = make_inputs(B, T)
        outs = {}
        for name, run in benches.items():
            t0 = time.perf_counter()
            try:
                r, outs[name] = run(x, args.iters)
            except Exception as e:
                print(f"{name} {shape} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            for r_ in r:
                r_ = dict(r_, shape=shape, B=B, T=T, H=H, K=K, V=V, **{"pass": r_["pass_"]})
                del r_["pass_"]
                r_["floor_ms"] = B * T * H * FLOOR_BYTES[r_["pass"]] / copy_bw * 1e3
                r_["x_floor"] = r_["ms"] / r_["floor_ms"]
                rows.append(r_)
            print(f"{shape} {name}: " + ", ".join(f"{r_['pass_']} {r_['ms']:.3f} ms ({r_['ms_pipelined']:.3f} back to back)"
                                                  for r_ in r)
                  + f" ({time.perf_counter() - t0:.0f} s with compiling)", flush=True)
            write(out, gpu, sha, rows, checks, [])  # after every implementation: a cut-off run keeps what it measured
        if "fla.chunk_kda" in outs:
            for name, o in outs.items():
                if name != "fla.chunk_kda":
                    checks.append(dict(shape=shape, impl=name, vs="fla.chunk_kda",
                                       rel_rmse_o=rel_rmse(o, outs["fla.chunk_kda"])))
            write(out, gpu, sha, rows, checks, [])

    mem = [] if args.no_memory or args.decode_only else memory_rows()
    write(out, gpu, sha, rows, checks, mem)

    print(f"\nGPU: {gpu}   (median ms of {args.iters} calls)")
    names = sorted({r["impl"] for r in rows if r["pass"] != "decode"})
    print(f"{'impl':18s} " + " ".join(f"{s + ' ' + p:>14s}" for s in SHAPES for p in ("fwd", "fwdbwd")))
    for n in names:
        cells = []
        for s in SHAPES:
            for p in ("fwd", "fwdbwd"):
                m = [r["ms"] for r in rows if r["impl"] == n and r["shape"] == s and r["pass"] == p]
                cells.append(f"{m[0]:14.2f}" if m else f"{'-':>14s}")
        print(f"{n:18s} " + " ".join(cells))
    for c in checks:
        print(f"agreement {c['shape']}: {c['impl']} vs fla rel RMSE {c['rel_rmse_o']:.2e}")
    for m in mem:
        print(f"chunked fwd+bwd T={m['T']}: temp {m['temp_bytes'] / 2**20:.0f} MiB "
              f"({m['temp_bytes_per_token_head']:.0f} B per token-head)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
