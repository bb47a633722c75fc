"""Grouped (per-expert) matmul over a block-aligned buffer, every pass block-wise.

Every group starts on a multiple of ``block`` rows, so each block of rows belongs to one expert
(``aligned_layout``). All three products are scans over chunks of blocks:

- forward ``y_b = x_b @ W[e_b]`` and input gradient ``dx_b = dy_b @ W[e_b]^T``: the chunk's expert
  weights are gathered (``[c, D, F]``) and multiplied as one batched matmul;
- weight gradient ``dW[e] += x_b^T dy_b``: per-block float32 products added into their experts.

Live memory is one chunk of ``[c, D, F]`` (``_CHUNK_BYTES``) and the work is the dense minimum
(``L * D * F``, ``L <= M + E * (block - 1)`` rows) plus one read of a weight matrix per block.
Why not ``lax.ragged_dot``: its weight gradient (a ragged *contracting* dimension) is lowered by
XLA as a dense ``[E, M, F]`` float32 intermediate (14–17 GiB per expert matmul at the 653M
scaling size), and on an H100 its forward ran at 8.5 ms where the same flops as one dense matmul
take 0.2 ms (653M shapes: 28672 rows, D = 1216, F = 1024, 64 experts; benchmarks/NOTES.md) —
42x, which made whole MoE train steps 60x slower than the model's flops.

``aligned_layout`` turns per-assignment group ids into that buffer's layout; ``grouped_matmul``
is the ``custom_vjp`` op over it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_CHUNK_BYTES = 256 * 2**20  # live float32 bytes of per-block weight-gradient products


class Layout(NamedTuple):
    dest_M: jax.Array         # [M] row of each assignment in the buffer; == L for dropped ones
    src_L: jax.Array          # [L] assignment held by each buffer row; == M for padding rows
    sizes_E: jax.Array        # [E] padded group sizes (multiples of block), the ragged_dot groups
    block_expert: jax.Array   # [L // block] expert owning each block (tail blocks: E - 1, all zero rows)


def buffer_rows(M: int, E: int, block: int) -> int:
    """Static buffer length: room for M rows plus each group's padding to a block multiple."""
    return -(-(M + E * (block - 1)) // block) * block


def aligned_layout(group_M: jax.Array, E: int, block: int) -> Layout:
    """Place assignments (group ids in ``[0, E]``; ``E`` means dropped) group by group, each group
    starting on a multiple of ``block``, keeping the assignments' order inside a group."""
    M = group_M.shape[0]
    L = buffer_rows(M, E, block)
    counts_G = jnp.bincount(group_M, length=E + 1).astype(jnp.int32)  # last: dropped
    padded_E = (counts_G[:E] + block - 1) // block * block
    start_E = jnp.cumsum(padded_E) - padded_E
    order_M = jnp.argsort(group_M, stable=True)
    group_sorted = group_M[order_M]
    first_sorted_G = jnp.cumsum(counts_G) - counts_G
    rank = jnp.arange(M, dtype=jnp.int32) - first_sorted_G[group_sorted]
    start_G = jnp.concatenate([start_E, jnp.array([L], jnp.int32)])
    dest_sorted = jnp.where(group_sorted < E, start_G[group_sorted] + rank, L)
    dest_M = jnp.zeros((M,), jnp.int32).at[order_M].set(dest_sorted)
    src_L = jnp.full((L,), M, jnp.int32).at[dest_M].set(jnp.arange(M, dtype=jnp.int32), mode="drop")
    ends_E = jnp.cumsum(padded_E)
    block_start = jnp.arange(L // block, dtype=jnp.int32) * block
    block_expert = jnp.minimum(jnp.searchsorted(ends_E, block_start, side="right"), E - 1).astype(jnp.int32)
    return Layout(dest_M, src_L, padded_E, block_expert)


def _chunked(nb: int, row_bytes: int):
    """(blocks per scan step, scan steps, padding blocks) for ``row_bytes`` of live data per block."""
    chunk = max(1, min(nb, _CHUNK_BYTES // row_bytes))
    steps = -(-nb // chunk)
    return chunk, steps, steps * chunk - nb


def _blocks(a_LX, nb, chunk, steps, pad):
    block = a_LX.shape[0] // nb
    return jnp.pad(a_LX.reshape(nb, block, -1), ((0, pad), (0, 0), (0, 0))).reshape(steps, chunk, block, -1)


def _per_block_matmul(a_LD, w_EDF, block_expert, transpose: bool):
    """``out_b = a_b @ W[e_b]`` (``W[e_b]^T`` if ``transpose``) in float32, chunk by chunk."""
    L, nb = a_LD.shape[0], block_expert.shape[0]
    E, D, F = w_EDF.shape
    chunk, steps, pad = _chunked(nb, D * F * 4)
    a = _blocks(a_LD, nb, chunk, steps, pad)
    owner = jnp.pad(block_expert, (0, pad), constant_values=E - 1).reshape(steps, chunk)
    spec = "cbf,cdf->cbd" if transpose else "cbd,cdf->cbf"

    def body(_, xs):
        a_c, e_c = xs
        return None, jnp.einsum(spec, a_c, w_EDF[e_c], preferred_element_type=jnp.float32)

    out = jax.lax.scan(body, None, (a, owner))[1]
    return out.reshape(steps * chunk * (L // nb), -1)[:L]


def _weight_grad(x_LD, g_LF, block_expert, num_experts):
    """``dW[e] = sum over blocks b of expert e: x_b^T g_b`` in float32, chunk by chunk."""
    (L, D), F = x_LD.shape, g_LF.shape[1]
    nb = block_expert.shape[0]
    chunk, steps, pad = _chunked(nb, D * F * 4)
    x, g = _blocks(x_LD, nb, chunk, steps, pad), _blocks(g_LF, nb, chunk, steps, pad)
    owner = jnp.pad(block_expert, (0, pad), constant_values=num_experts - 1).reshape(steps, chunk)

    def body(acc, xs):
        x_c, g_c, e_c = xs
        prod = jnp.einsum("cbd,cbf->cdf", x_c, g_c, preferred_element_type=jnp.float32)
        return acc.at[e_c].add(prod, indices_are_sorted=True), None

    acc = jnp.zeros((num_experts, D, F), jnp.float32)
    return jax.lax.scan(body, acc, (x, g, owner))[0]


def _live_rows(out_LX, sizes_E):
    """Zero the rows past the last group (tail blocks belong to no expert)."""
    return jnp.where((jnp.arange(out_LX.shape[0]) < jnp.sum(sizes_E))[:, None], out_LX, 0.0)


@jax.custom_vjp
def grouped_matmul(x_LD: jax.Array, w_EDF: jax.Array, sizes_E: jax.Array, block_expert: jax.Array) -> jax.Array:
    """``y[rows of group e] = x[rows of group e] @ w[e]`` with float32 accumulation and output.

    ``sizes_E`` and ``block_expert`` come from ``aligned_layout``; rows past ``sum(sizes_E)`` give 0.
    """
    return _live_rows(_per_block_matmul(x_LD, w_EDF, block_expert, transpose=False), sizes_E)


def _fwd(x_LD, w_EDF, sizes_E, block_expert):
    return grouped_matmul(x_LD, w_EDF, sizes_E, block_expert), (x_LD, w_EDF, sizes_E, block_expert)


def _bwd(res, g_LF):
    x_LD, w_EDF, sizes_E, block_expert = res
    g = _live_rows(g_LF, sizes_E).astype(x_LD.dtype)
    dx = _live_rows(_per_block_matmul(g, w_EDF, block_expert, transpose=True), sizes_E)
    dw = _weight_grad(x_LD, g, block_expert, w_EDF.shape[0])
    return dx.astype(x_LD.dtype), dw.astype(w_EDF.dtype), None, None


grouped_matmul.defvjp(_fwd, _bwd)
