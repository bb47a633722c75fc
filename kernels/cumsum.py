"""The gate's in-chunk cumulative sum and its adjoint, as Pallas Mosaic GPU kernels.

Chunked KDA starts from G, the inclusive cumsum of the log decay inside each chunk, in the
chunk-major layout of the other kernels, and its backward ends with the reverse (suffix) sum of
dG back in the caller's layout (kda_spec §3.1, §4.2 step 7). In XLA each is a transpose, a
HIGHEST-precision GEMM against a triangle of ones and a transpose back: ~0.26 ms at the mid
benchmark shape on an H200 for 268 MB of traffic, ~4× its byte time (benchmarks/NOTES.md v11).
Here one CTA per (chunk, batch row, head) reads its ``[C, K]`` slab once, sums in registers and
writes it once, in the other layout:

    ``chunk_cumsum``:  a ``[B, T, H, K]`` -> G ``[N, B, H, C, K]``,  G[n, :, :, i] = Σ_{j ≤ i} a[nC + j]
    ``chunk_cumsum_adjoint``: dG ``[N, B, H, C, K]`` -> da ``[B, T, H, K]``,  da[nC + j] = Σ_{i ≥ j} dG[n, :, :, i]

The sum is a log-depth (Hillis–Steele) scan over a ``[C, BLOCK_K]`` register tile: at step s the
tile adds itself shifted by s rows, read back from shared memory whose rows outside the chunk are
zero; so row i only ever meets rows of its own chunk on its own side (causal: nothing reaches G_i
from a later token). float32 throughout; each sum rounds as a balanced tree (log₂ C additions per
entry), where the sequential sum rounds C times.

With ``floor`` the forward sums max(a, floor) and the adjoint multiplies by that max's derivative
(reading a again): the front door's gate floor (``inputs.GATE_FLOOR``) inside the pass that reads
the gate anyway, instead of an XLA pass of its own before the kernel (``kernels.kda.GATE_FLOOR_KERNEL``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kda_jax.kernels.intra import BLOCK_K, _padded
from kda_jax.kernels.state_pass import _F32, _WG, _kernel, check_operand, chunk

_check = functools.partial(check_operand, "chunk cumsum")


def _scan(x, buf, C, reverse):
    """Inclusive prefix sums over the rows of ``x [C, BLOCK_K]`` (float32, WGMMA layout), from the
    end if ``reverse``. ``buf`` holds the tile at rows [C/2, 3C/2) between two zero blocks of C/2 rows."""
    pad, s = C // 2, 1
    while s < C:
        buf.at[pl.ds(pad, C), pl.ds(0, BLOCK_K)][...] = x
        plgpu.commit_smem()  # the tile is visible to the whole warpgroup
        start = pad + s if reverse else pad - s
        x = x + plgpu.load(buf.at[pl.ds(start, C), pl.ds(0, BLOCK_K)], layout=_WG, optimized=False)
        plgpu.commit_smem()  # every thread has read its shifted rows before the next write
        s *= 2
    return x


def _launch(N, B, H, C, K, out_shape, reverse, name, interpret, floor=None, with_gate=False):
    """One CTA per (chunk, batch row, head) over ``[C, K]`` slabs (``state_pass.chunk``: each ref
    chunk-major or time-major by its rank). With ``floor`` the forward sums max(a, floor); the adjoint
    (``with_gate``: a second input, a) scales its sums by that max's derivative in a (1 above the
    floor, ½ on it, 0 below: ``jnp.maximum``'s)."""
    if C % 64 or K % BLOCK_K:
        raise ValueError(f"chunk cumsum needs C a multiple of 64 and K of {BLOCK_K}; got C={C} K={K}")

    def body(x_ref, *refs):
        (a_ref, y_ref, buf) = refs if with_gate else (None, *refs)
        idx = (lax.axis_index("n"), lax.axis_index("b"), lax.axis_index("h"))
        zero = plgpu.layout_cast(jnp.zeros((C, BLOCK_K), _F32), _WG)
        for r0 in (0, C):  # the zero blocks on either side (the tile's rows are rewritten each step)
            buf.at[pl.ds(r0, C), pl.ds(0, BLOCK_K)][...] = zero
        # every column block's load first (K/BLOCK_K · 16 registers), so they are in flight together
        # rather than one per round of the scan's barriers
        cols = [pl.ds(cb * BLOCK_K, BLOCK_K) for cb in range(K // BLOCK_K)]
        load = lambda ref, c: plgpu.load(chunk(ref, idx, C).at[:, c], layout=_WG, optimized=False)
        xs = [load(x_ref, c) for c in cols]
        if floor is not None and not with_gate:
            xs = [jnp.maximum(x, floor) for x in xs]
        gs = [load(a_ref, c) for c in cols] if with_gate else [None] * len(cols)
        for c, x, a in zip(cols, xs, gs):
            y = _scan(x, buf, C, reverse)
            if a is not None:
                y = jnp.where(a > floor, y, jnp.where(a == floor, 0.5 * y, 0.0))
            chunk(y_ref, idx, C).at[:, c][...] = y

    kern = _kernel(body, name=name, interpret=interpret, grid=(N, B, H), grid_names=("n", "b", "h"),
                   out_type=jax.ShapeDtypeStruct(out_shape, _F32), scratch_types=[_padded(2 * C, _F32)])
    return kern


@functools.partial(jax.jit, static_argnames=("chunk_size", "floor", "interpret"))
def chunk_cumsum(a, *, chunk_size, floor=None, interpret=False):
    """G ``[N, B, H, C, K]`` float32, the inclusive cumsum inside each chunk of C = ``chunk_size``
    rows, from float32 ``a [B, T, H, K]`` (T a multiple of C); with ``floor`` (a float), the cumsum
    of max(a, floor) (the front door's gate floor, in the same pass)."""
    B, T, H, K = a.shape
    C = chunk_size
    if T % C:
        raise ValueError(f"chunk cumsum: T={T} is not a multiple of the chunk size {C} (pad first)")
    _check("a", a, (B, T, H, K), _F32)
    N = T // C
    return _launch(N, B, H, C, K, (N, B, H, C, K), False, "kda_chunk_cumsum", interpret, floor=floor)(a)


@functools.partial(jax.jit, static_argnames=("floor", "interpret"))
def chunk_cumsum_adjoint(dG, a=None, *, floor=None, interpret=False):
    """da ``[B, T, H, K]`` float32 (T = N·C), the adjoint of ``chunk_cumsum``: the sum of dG over each
    row and the rows after it in its chunk, from float32 ``dG [N, B, H, C, K]``; with ``floor``, times
    the derivative of max(a, floor) at float32 ``a [B, T, H, K]`` (the forward's input)."""
    N, B, H, C, K = dG.shape
    _check("dG", dG, (N, B, H, C, K), _F32)
    if floor is not None:
        if a is None:
            raise ValueError("chunk cumsum adjoint: a floor needs the forward's input a")
        _check("a", a, (B, N * C, H, K), _F32)
    kern = _launch(N, B, H, C, K, (B, N * C, H, K), True, "kda_chunk_cumsum_adjoint", interpret, floor=floor,
                   with_gate=floor is not None)
    return kern(dG) if floor is None else kern(dG, a)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def gate_cumsum(a, chunk_size, interpret=False, floor=None):
    """``chunk_cumsum`` with ``chunk_cumsum_adjoint`` as its VJP."""
    return chunk_cumsum(a, chunk_size=chunk_size, floor=floor, interpret=interpret)


def _gate_cumsum_fwd(a, chunk_size, interpret, floor):
    return gate_cumsum(a, chunk_size, interpret, floor), (a if floor is not None else None)


def _gate_cumsum_bwd(chunk_size, interpret, floor, a, dG):
    return (chunk_cumsum_adjoint(dG.astype(_F32), a, floor=floor, interpret=interpret),)


gate_cumsum.defvjp(_gate_cumsum_fwd, _gate_cumsum_bwd)
