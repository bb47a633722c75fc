"""The serial pass of chunked KDA over the chunks, as Pallas Mosaic GPU kernels (H100).

The chunked algorithm (kda_spec §3.2, ``kda_jax.ops.chunked``) is parallel over chunks except
for one recurrence. Per (batch, value head), with chunk-major inputs ``W, Kd [N, C, K]``,
``U [N, C, V]`` and the state decay ``gend [N, K]`` (already exponentiated, zero where a
document boundary inside the chunk cuts the carry):

    forward:   h_n = S;  Vn_n = U_n − W_n·S;  S ← gend_n ⊙ S + Kd_nᵀ·Vn_n
    backward:  dS_n = dS (the gradient reaching the state at the start of chunk n+1);
               dVn_n = dVl_n + Kd_n·dS;  dS ← Qd_n + gend_n ⊙ dS − W_nᵀ·dVn_n   (reverse order)

``forward_pass`` (h, Vn and the final state, for the backward), ``output_pass`` (the same pass
forming each chunk's output o = Qs·h + Aqk·Vn on the tensor cores, for the forward: h and Vn
never reach HBM) and ``reverse_pass`` run them with one CTA (one warpgroup) per
``(value tile of bv columns, value head, batch row)`` (``BLOCK_V``): the state tile ``[K, bv]`` stays
in float32 registers for the whole sequence, each chunk's operands arrive by TMA into
double-buffered shared memory while the previous chunk computes, and the two products per
chunk run on the tensor cores (wgmma, bf16 operands, float32 accumulation — the precision map
of kda_spec §3.5 v: the state is float32, the operands it meets are bf16). Everything parallel
over chunks (the intra-chunk matrices, the inverse, W/U/Kd, the output and the gradients that
follow from h, Vn, dS and dVn) stays in XLA around these kernels (``kda_jax.kernels.kda``).

In interpret mode (``interpret=True``) the same kernels run on CPU through
``plgpu.InterpretGPUParams`` for the tests. The interpreter keeps its simulated GPU memory in one
process-global object, so two interpreted kernels must not run at once: set
``jax.config.update("jax_cpu_enable_async_dispatch", False)`` before the CPU backend starts (as
tests/conftest.py does); with asynchronous dispatch a gradient taken eagerly hung (the next kernel
started while the previous one still ran).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

BLOCK_V = 64  # the value-tile width when a call names none (read while tracing)
# Widths the passes accept. Narrower tiles give more CTAs (V / bv × heads × batch) but were not
# faster: 32 and 16 against 64 at the mid shape (64 → 128 CTAs) and the long one (32 → 128) moved the
# op by −2% to +10% on an H200 (benchmarks/NOTES.md v5; ``benchmarks/state_tiles.py``): each chunk's
# step is latency-bound, not short of SMs.
BLOCK_V_CHOICES = (64, 32, 16)
_WG = plgpu.Layout.WGMMA
_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a WGMMA-layout tile
_BF16, _F32 = jnp.bfloat16, jnp.float32


def _value_tile(bv, V, C, K):
    bv = min(BLOCK_V, V) if bv is None else bv
    if bv not in BLOCK_V_CHOICES or V % bv or C % 64 or K % 64:
        raise ValueError(f"state pass needs C, K multiples of 64 and a value tile in {BLOCK_V_CHOICES} dividing V; "
                         f"got C={C} K={K} V={V} tile={bv}")
    return bv


def _tiled(shape, dtype=_BF16, minor=None):
    """SMEM tiled and swizzled for TMA and wgmma; ``minor`` is the width whose swizzle it takes."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle((minor or shape[-1]) * itemsize * 8)
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle // itemsize)),
                                               plgpu.SwizzleTransform(swizzle)))


def _kernel(body, *, name, interpret, approx_math=False, **kw):
    params = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane, approx_math=approx_math)
    return plgpu.kernel(body, kernel_name=name, compiler_params=params,
                        interpret=plgpu.InterpretGPUParams() if interpret else None, **kw)


def _mm(shape, *pairs):
    """``sum(a @ b)`` over SMEM operand pairs on the tensor cores, float32 accumulator."""

    def scoped(acc):
        for a, b in pairs:
            plgpu.wgmma(acc, a, b)
        return acc[...]

    return pl.run_scoped(scoped, plgpu.ACC(shape, _F32))


def chunk(ref, idx, C):
    """The ``[C, D]`` slab of chunk n, batch row b, head h (``idx``) of a chunk-major ``[N, B, H, C, D]``
    ref, or of a time-major ``[B, N·C, H, D]`` one (the caller's layout: no transpose before the kernel)."""
    n, b, h = idx
    return ref.at[n, b, h] if len(ref.shape) == 5 else ref.at[b, pl.ds(n * C, C), h]


def check_operand(kernel, name, x, shape, dtypes):
    """ValueError naming ``kernel`` and operand ``name`` unless x has ``shape`` and one of ``dtypes``."""
    dtypes = [jnp.dtype(d) for d in (dtypes if isinstance(dtypes, (tuple, list)) else (dtypes,))]
    if x.shape != tuple(shape) or x.dtype not in dtypes:
        names = "/".join(d.name for d in dtypes)
        raise ValueError(f"{kernel}: {name} must be {names}{list(shape)}, got {x.dtype}{list(x.shape)}")


_check = functools.partial(check_operand, "state pass")


@functools.partial(jax.jit, static_argnames=("interpret", "bv"))
def forward_pass(W, U, Kd, gend, h0, *, interpret=False, bv=None):
    """``(h [N,B,H,K,V] bf16, Vn [N,B,H,C,V] bf16, S_T [B,H,K,V] f32)`` from bf16 ``W, Kd
    [N,B,H,C,K]``, ``U [N,B,H,C,V]``, f32 ``gend [N,B,H,K]`` and ``h0 [B,H,K,V]``; ``bv`` the
    value-tile width (default ``BLOCK_V``)."""
    return _forward(W, U, Kd, gend, h0, None, None, out_dtype=None, interpret=interpret, bv=bv)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "bv", "time_major"))
def output_pass(W, U, Kd, gend, h0, Qs, Aqk, *, out_dtype=jnp.float32, interpret=False, bv=None, time_major=False):
    """``(o [N,B,H,C,V] out_dtype, S_T [B,H,K,V] f32)``: the forward pass that also forms each
    chunk's output ``o = Qs·h + Aqk·Vn`` on the tensor cores, so h and Vn never reach HBM.
    ``Qs [N,B,H,C,K]`` (= s·Q⊙Γ) and ``Aqk [N,B,H,C,C]`` bf16; the rest as ``forward_pass``;
    ``time_major``: o in the caller's layout ``[B, N·C, H, V]`` instead."""
    return _forward(W, U, Kd, gend, h0, Qs, Aqk, out_dtype=jnp.dtype(out_dtype), interpret=interpret, bv=bv,
                    time_major=time_major)


def _forward(W, U, Kd, gend, h0, Qs, Aqk, *, out_dtype, interpret, bv, time_major=False):
    N, B, H, C, K = W.shape
    V = U.shape[-1]
    emit_o = Qs is not None
    checks = [("W", W, (N, B, H, C, K), _BF16), ("Kd", Kd, (N, B, H, C, K), _BF16), ("U", U, (N, B, H, C, V), _BF16),
              ("gend", gend, (N, B, H, K), _F32), ("h0", h0, (B, H, K, V), _F32)]
    if emit_o:
        checks += [("Qs", Qs, (N, B, H, C, K), _BF16), ("Aqk", Aqk, (N, B, H, C, C), _BF16)]
    for name, x, shape, dt in checks:
        _check(name, x, shape, dt)
    bv = _value_tile(bv, V, C, K)

    def body(*refs):
        if emit_o:
            (w_ref, u_ref, kd_ref, g_ref, h0_ref, q_ref, a_ref, o_ref, st_ref,
             w_s, u_s, kd_s, g_s, s_s, vn_s, q_s, a_s, bars) = refs
        else:
            (w_ref, u_ref, kd_ref, g_ref, h0_ref, h_ref, vn_ref, st_ref, w_s, u_s, kd_s, g_s, s_s, vn_s, bars) = refs
        vt, h, b = lax.axis_index("v"), lax.axis_index("h"), lax.axis_index("b")
        cols = pl.ds(vt * bv, bv)

        def fetch(n, slot):
            bar = bars.at[slot]
            plgpu.copy_gmem_to_smem(w_ref.at[n, b, h], w_s.at[slot], bar)
            plgpu.copy_gmem_to_smem(u_ref.at[n, b, h, :, cols], u_s.at[slot], bar)
            plgpu.copy_gmem_to_smem(kd_ref.at[n, b, h], kd_s.at[slot], bar)
            plgpu.copy_gmem_to_smem(g_ref.at[n, b, h], g_s.at[slot], bar)
            if emit_o:
                plgpu.copy_gmem_to_smem(q_ref.at[n, b, h], q_s.at[slot], bar)
                plgpu.copy_gmem_to_smem(a_ref.at[n, b, h], a_s.at[slot], bar)

        fetch(0, 0)
        s0 = plgpu.load(h0_ref.at[b, h, :, cols], layout=_WG, optimized=False)

        def step(n, s):
            slot = lax.rem(n, 2)

            @pl.when(n + 1 < N)
            def _():
                fetch(n + 1, 1 - slot)

            plgpu.barrier_wait(bars.at[slot])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # last chunk's stores have read s_s, vn_s
            s_s[...] = s.astype(_BF16)
            plgpu.commit_smem()
            if not emit_o:
                plgpu.copy_smem_to_gmem(s_s, h_ref.at[n, b, h, :, cols], commit_group=False)
            vn = plgpu.load(u_s.at[slot], layout=_WG, optimized=False).astype(_F32) - _mm((C, bv), (w_s.at[slot], s_s))
            vn_s[...] = vn.astype(_BF16)
            plgpu.commit_smem()
            if emit_o:
                o = _mm((C, bv), (q_s.at[slot], s_s), (a_s.at[slot], vn_s))
                chunk(o_ref, (n, b, h), C).at[:, cols][...] = o.astype(out_dtype)
            else:
                plgpu.copy_smem_to_gmem(vn_s, vn_ref.at[n, b, h, :, cols], commit_group=False)
                plgpu.commit_smem_to_gmem_group()
            decay = plgpu.load(g_s.at[slot], layout=_ROW, optimized=False)
            return lax.broadcast_in_dim(decay, (K, bv), [0]) * s + _mm((K, bv), (kd_s.at[slot].T, vn_s))

        s = lax.fori_loop(0, N, step, s0)
        st_ref.at[b, h, :, cols][...] = s
        plgpu.wait_smem_to_gmem(0)

    scratch = [
        _tiled((2, C, K), minor=bv),  # W (its wgmma partner is a bv-wide tile)
        _tiled((2, C, bv)),  # U
        _tiled((2, C, K), minor=bv),  # Kd
        plgpu.SMEM((2, K), _F32),  # gend
        _tiled((K, bv)),  # state entering the chunk, bf16
        _tiled((C, bv)),  # Vn
    ]
    if emit_o:
        scratch += [_tiled((2, C, K), minor=bv), _tiled((2, C, C), minor=bv)]  # Qs, Aqk
        o_shape = (B, N * C, H, V) if time_major else (N, B, H, C, V)
        out = (jax.ShapeDtypeStruct(o_shape, out_dtype), jax.ShapeDtypeStruct((B, H, K, V), _F32))
        args = (W, U, Kd, gend, h0, Qs, Aqk)
    else:
        out = (jax.ShapeDtypeStruct((N, B, H, K, V), _BF16), jax.ShapeDtypeStruct((N, B, H, C, V), _BF16),
               jax.ShapeDtypeStruct((B, H, K, V), _F32))
        args = (W, U, Kd, gend, h0)
    scratch.append(plgpu.Barrier(num_arrivals=6 if emit_o else 4, num_barriers=2))
    kern = _kernel(body, name="kda_state_output" if emit_o else "kda_state_forward", interpret=interpret,
                   out_type=out, grid=(V // bv, H, B), grid_names=("v", "h", "b"), scratch_types=tuple(scratch))
    return kern(*args)


@functools.partial(jax.jit, static_argnames=("interpret", "bv"))
def reverse_pass(dO, Aqk, Qs, Kd, W, gend, dS_T, *, interpret=False, bv=None):
    """``(dSn [N,B,H,K,V] f32, dVn [N,B,H,C,V] f32, dh0 [B,H,K,V] f32)``, the chunks in reverse.

    ``dSn[n]`` is the gradient of the state leaving chunk n (entering n + 1); per chunk
    ``dVn = Aqkᵀ·dO + Kd·dS`` and ``dS ← Qsᵀ·dO + gend ⊙ dS − Wᵀ·dVn``, with ``Qs = s·Q⊙Γ``.
    bf16 ``dO [N,B,H,C,V]``, ``Aqk [N,B,H,C,C]``, ``Qs, Kd, W [N,B,H,C,K]``; f32 ``gend``, ``dS_T``.
    """
    N, B, H, C, K = W.shape
    V = dO.shape[-1]
    for name, x, shape, dt in (("dO", dO, (N, B, H, C, V), _BF16), ("Aqk", Aqk, (N, B, H, C, C), _BF16),
                               ("Qs", Qs, (N, B, H, C, K), _BF16), ("Kd", Kd, (N, B, H, C, K), _BF16),
                               ("W", W, (N, B, H, C, K), _BF16), ("gend", gend, (N, B, H, K), _F32),
                               ("dS_T", dS_T, (B, H, K, V), _F32)):
        _check(name, x, shape, dt)
    bv = _value_tile(bv, V, C, K)

    def body(do_ref, a_ref, q_ref, kd_ref, w_ref, g_ref, dst_ref, dsn_ref, dvn_ref, dh0_ref,
             do_s, a_s, q_s, kd_s, w_s, g_s, ds_s, dvn_s, bars):
        vt, h, b = lax.axis_index("v"), lax.axis_index("h"), lax.axis_index("b")
        cols = pl.ds(vt * bv, bv)

        def fetch(n, slot):
            bar = bars.at[slot]
            plgpu.copy_gmem_to_smem(do_ref.at[n, b, h, :, cols], do_s.at[slot], bar)
            plgpu.copy_gmem_to_smem(a_ref.at[n, b, h], a_s.at[slot], bar)
            plgpu.copy_gmem_to_smem(q_ref.at[n, b, h], q_s.at[slot], bar)
            plgpu.copy_gmem_to_smem(kd_ref.at[n, b, h], kd_s.at[slot], bar)
            plgpu.copy_gmem_to_smem(w_ref.at[n, b, h], w_s.at[slot], bar)
            plgpu.copy_gmem_to_smem(g_ref.at[n, b, h], g_s.at[slot], bar)

        fetch(N - 1, 0)
        ds0 = plgpu.load(dst_ref.at[b, h, :, cols], layout=_WG, optimized=False)

        def step(i, ds):
            n, slot = N - 1 - i, lax.rem(i, 2)

            @pl.when(i + 1 < N)
            def _():
                fetch(n - 1, 1 - slot)

            plgpu.barrier_wait(bars.at[slot])
            dsn_ref.at[n, b, h, :, cols][...] = ds
            ds_s[...] = ds.astype(_BF16)
            plgpu.commit_smem()
            dvn = _mm((C, bv), (a_s.at[slot].T, do_s.at[slot]), (kd_s.at[slot], ds_s))
            dvn_ref.at[n, b, h, :, cols][...] = dvn
            dvn_s[...] = dvn.astype(_BF16)
            plgpu.commit_smem()
            decay = plgpu.load(g_s.at[slot], layout=_ROW, optimized=False)
            back = _mm((K, bv), (q_s.at[slot].T, do_s.at[slot])) - _mm((K, bv), (w_s.at[slot].T, dvn_s))
            return back + lax.broadcast_in_dim(decay, (K, bv), [0]) * ds

        dh0_ref.at[b, h, :, cols][...] = lax.fori_loop(0, N, step, ds0)

    scratch = (
        _tiled((2, C, bv)),  # dO
        _tiled((2, C, C), minor=bv),  # Aqk
        _tiled((2, C, K), minor=bv),  # Qs
        _tiled((2, C, K), minor=bv),  # Kd
        _tiled((2, C, K), minor=bv),  # W
        plgpu.SMEM((2, K), _F32),  # gend
        _tiled((K, bv)),  # dS leaving the chunk, bf16
        _tiled((C, bv)),  # dVn, bf16
        plgpu.Barrier(num_arrivals=6, num_barriers=2),
    )
    out = (jax.ShapeDtypeStruct((N, B, H, K, V), _F32), jax.ShapeDtypeStruct((N, B, H, C, V), _F32),
           jax.ShapeDtypeStruct((B, H, K, V), _F32))
    kern = _kernel(body, name="kda_state_reverse", interpret=interpret, out_type=out,
                   grid=(V // bv, H, B), grid_names=("v", "h", "b"), scratch_types=scratch)
    return kern(dO, Aqk, Qs, Kd, W, gend, dS_T)
