"""Row-wise expert products for decode-sized MoE calls, reading each selected expert in place.

``out[m] = a[m] @ w[idx[m]]`` for a few rows ``m`` (decoding a few sequences: M = N·K assignments,
no more than the number of experts). XLA can only gather the M selected ``[Din, Dout]`` matrices
into a new buffer and multiply that: every selected weight is read, written and read again
(benchmarks/NOTES.md, "MoE decode"). Here each CTA (one warpgroup) owns one (row m, 64-column
tile of Dout) pair: it reads ``idx[m]`` from global memory and streams that expert's column tile
straight from ``w`` by TMA through a multi-stage shared-memory pipeline into the tensor cores.

The A operand of each wgmma is the block of 64 rows of ``a`` holding row m (rows past M are
zeros); only row m of the float32 product is stored. The redundant rows cost no memory traffic
(the weights dominate it), and the block is the same for every CTA of a row block.

``expert_rows`` wraps it with its gradients (the backward is XLA: decode never differentiates,
the tests do). In interpret mode (``interpret=True``) the kernel runs on CPU through
``plgpu.InterpretGPUParams`` for the tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

BLOCK_ROWS = 64  # rows of one wgmma A operand
BLOCK_N = 64  # output columns per CTA
BLOCK_K = 64  # contraction rows per pipeline step
STAGES = 4  # pipeline steps in flight per CTA


@functools.partial(jax.jit, static_argnames=("interpret",))
def gathered_matmul(a, idx, ws, *, interpret=False):
    """Float32 ``[len(ws), M, Dout]``: entry ``[j, m]`` is ``a[m] @ ws[j][idx[m]]``. a ``[M, Din]``
    bf16, idx ``[M]`` int32 in ``[0, E)`` (not checked: the caller clips), ``ws`` a tuple of
    ``[E, Din, Dout]`` bf16 (the up and gate projections share a and idx: one kernel for both);
    Din and Dout multiples of 64."""
    M, D = a.shape
    E, D2, F = ws[0].shape
    if a.dtype != jnp.bfloat16 or any(w.dtype != jnp.bfloat16 for w in ws):
        raise ValueError(f"gathered_matmul needs bf16 a and weights, got {a.dtype} and {[w.dtype for w in ws]}")
    if D2 != D or idx.shape != (M,) or any(w.shape != ws[0].shape for w in ws):
        raise ValueError(f"gathered_matmul: a {a.shape}, idx {idx.shape} and weights {[w.shape for w in ws]} do not match")
    if D % BLOCK_K or F % BLOCK_N:
        raise ValueError(f"gathered_matmul needs Din and Dout multiples of 64, got {D} and {F}")
    rows = -(-M // BLOCK_ROWS) * BLOCK_ROWS
    a_pad = jnp.pad(a, ((0, rows - M), (0, 0)))

    def body(idx_gmem, a_gmem, *refs):
        w_gmems, o_gmem = refs[:-1], refs[-1]
        n, m, j = lax.axis_index("n"), lax.axis_index("m"), lax.axis_index("w")
        e = idx_gmem[m]
        block = lax.div(m, jnp.int32(BLOCK_ROWS))

        def product(w_gmem, o_row):  # o_row: this CTA's [1, BLOCK_N] slice of the output
            def acc_scope(acc_ref):
                plgpu.emit_pipeline(
                    lambda _, a_smem, w_smem: plgpu.wgmma(acc_ref, a_smem, w_smem),
                    grid=(D // BLOCK_K,),
                    in_specs=[plgpu.BlockSpec((BLOCK_ROWS, BLOCK_K), lambda k: (block, k), delay_release=1),
                              plgpu.BlockSpec((BLOCK_K, BLOCK_N), lambda k: (k, n), delay_release=1)],
                    max_concurrent_steps=STAGES,
                )(a_gmem, w_gmem.at[e])
                return acc_ref[...]

            acc = pl.run_scoped(acc_scope, plgpu.ACC((BLOCK_ROWS, BLOCK_N)))

            def store_scope(o_smem):
                o_smem[...] = acc
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(lax.rem(m, jnp.int32(BLOCK_ROWS)), 1)], o_row)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

            pl.run_scoped(store_scope, plgpu.SMEM((BLOCK_ROWS, BLOCK_N), jnp.float32))

        for jj, w_gmem in enumerate(w_gmems):
            o_row = o_gmem.at[jj, pl.ds(m, 1), pl.ds(n * BLOCK_N, BLOCK_N)]
            if len(w_gmems) == 1:
                product(w_gmem, o_row)
            else:
                pl.when(j == jj)(functools.partial(product, w_gmem, o_row))

    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((len(ws), M, F), jnp.float32), grid=(F // BLOCK_N, M, len(ws)),
        grid_names=("n", "m", "w"), kernel_name="moe_gathered_matmul",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret else None)
    return kernel(idx.astype(jnp.int32), a_pad, *ws)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def expert_rows(a, idx, ws, interpret=False):
    """``gathered_matmul`` with gradients for a and the weights (idx is an integer input)."""
    return gathered_matmul(a, idx, ws, interpret=interpret)


def _fwd(a, idx, ws, interpret):
    return gathered_matmul(a, idx, ws, interpret=interpret), (a, idx, ws)


def _bwd(interpret, res, g):
    del interpret
    a, idx, ws = res
    g = g.astype(ws[0].dtype)
    da = sum(jnp.einsum("mf,mdf->md", g[j], w[idx], preferred_element_type=jnp.float32) for j, w in enumerate(ws))
    dws = tuple(jnp.zeros(w.shape, jnp.float32).at[idx].add(
        jnp.einsum("md,mf->mdf", a, g[j], preferred_element_type=jnp.float32)).astype(w.dtype) for j, w in enumerate(ws))
    return da.astype(a.dtype), None, dws


expert_rows.defvjp(_fwd, _bwd)
