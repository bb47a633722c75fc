"""Grouped (per-expert) matmul over a block-aligned buffer, with a weight gradient that stays small.

``lax.ragged_dot`` is the forward and the input gradient. Its weight gradient (a ragged
*contracting* dimension, ``dW[e] = X_e^T dY_e``) is lowered by XLA as a dense ``[E, M, F]``
float32 intermediate — 14–17 GiB per expert matmul at the paper's 653M scaling size (issue 4),
which does not fit one H100. Here every group starts on a multiple of ``block`` rows, so each
block of rows belongs to one expert; the weight gradient is a scan over chunks of blocks,
``acc[expert_of_block] += X_blk^T dY_blk``, whose live memory is one chunk of ``[c, D, F]``
float32 products (``_CHUNK_BYTES``), and whose work is the dense minimum (``L * D * F``, with
``L <= M + E * (block - 1)`` rows).

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


def _weight_grad(x_LD, g_LF, block_expert, num_experts):
    """``dW[e] = sum over blocks b of expert e: x_b^T g_b`` in float32, chunk by chunk."""
    (L, D), F = x_LD.shape, g_LF.shape[1]
    nb = block_expert.shape[0]
    block = L // nb
    chunk = max(1, min(nb, _CHUNK_BYTES // (D * F * 4)))
    steps = -(-nb // chunk)
    pad = steps * chunk - nb
    x = jnp.pad(x_LD.reshape(nb, block, D), ((0, pad), (0, 0), (0, 0))).reshape(steps, chunk, block, D)
    g = jnp.pad(g_LF.reshape(nb, block, F), ((0, pad), (0, 0), (0, 0))).reshape(steps, chunk, block, F)
    owner = jnp.pad(block_expert, (0, pad), constant_values=num_experts - 1).reshape(steps, chunk)

    def body(acc, xs):
        x_c, g_c, e_c = xs
        prod = jnp.einsum("cbd,cbf->cdf", x_c, g_c, preferred_element_type=jnp.float32)
        return acc.at[e_c].add(prod, indices_are_sorted=True), None

    acc = jnp.zeros((num_experts, D, F), jnp.float32)
    return jax.lax.scan(body, acc, (x, g, owner))[0]


@jax.custom_vjp
def grouped_matmul(x_LD: jax.Array, w_EDF: jax.Array, sizes_E: jax.Array, block_expert: jax.Array) -> jax.Array:
    """``y[rows of group e] = x[rows of group e] @ w[e]`` with float32 accumulation and output.

    ``sizes_E`` and ``block_expert`` come from ``aligned_layout``; rows past ``sum(sizes_E)`` give 0.
    """
    return jax.lax.ragged_dot(x_LD, w_EDF, sizes_E, preferred_element_type=jnp.float32)


def _fwd(x_LD, w_EDF, sizes_E, block_expert):
    return grouped_matmul(x_LD, w_EDF, sizes_E, block_expert), (x_LD, w_EDF, sizes_E, block_expert)


def _bwd(res, g_LF):
    x_LD, w_EDF, sizes_E, block_expert = res
    g = g_LF.astype(x_LD.dtype)
    dx = jax.lax.ragged_dot(g, jnp.swapaxes(w_EDF, 1, 2), sizes_E, preferred_element_type=jnp.float32)
    dw = _weight_grad(x_LD, g, block_expert, w_EDF.shape[0])
    return dx.astype(x_LD.dtype), dw.astype(w_EDF.dtype), None, None


grouped_matmul.defvjp(_fwd, _bwd)
