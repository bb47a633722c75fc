"""KDA decode step as a Pallas Mosaic GPU kernel: a few tokens against a float32 state, in place.

Decode is bound by state traffic: per token and value head the recurrence (kda_spec §6.2)

    S ← Diag(e^{g}) S;   Vn = β v − β kᵀS;   S ← S + k ⊗ Vn;   o = s qᵀS

touches the whole ``[K, V]`` float32 state (128 KB at K = V = 128) and little else. XLA runs it
as several fusions that each read the state; this kernel reads each state tile once, applies
all the new tokens with the tile in registers and writes it back once, into the same buffer:
the state enters the kernel as a mutable ``jax.Ref``, so with the caller's state donated the
update is in place (no second state buffer).

One warpgroup per (64-column value tile, value head, batch row); the tile ``[K, 64]`` is held
in the WGMMA register layout, the per-token row vectors (e^{g}, k, β·k, q, indexed by K)
broadcast over columns and the column vectors (β·v, Vn, o, indexed by V) over rows; the two
reductions over K go through shared memory. β is folded into k and v outside (no scalar loads).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kda_jax.kernels.state_pass import _F32, _ROW, _WG, BLOCK_V, _kernel

_COL = plgpu.Layout.WGMMA.reduce(0)  # a vector over V (the columns of the state tile)


def _check(name, x, shape):
    if x.shape != shape or x.dtype != jnp.dtype(_F32):
        raise ValueError(f"decode kernel: {name} must be float32{list(shape)}, got {x.dtype}{list(x.shape)}")


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def decode_step(q, k, v, g, beta, state, *, scale, interpret=False):
    """(o ``[B, S, H, V]`` float32, new state) for float32 canonical inputs with value heads
    expanded: q, k, g ``[B, S, H, K]``, v ``[B, S, H, V]``, beta ``[B, S, H]``, state ``[B, H, K, V]``
    (written in place when the caller's jit donates it). K and V multiples of 64."""
    B, S, H, K = q.shape
    V = v.shape[-1]
    for name, x, shape in (("q", q, (B, S, H, K)), ("k", k, (B, S, H, K)), ("g", g, (B, S, H, K)),
                           ("v", v, (B, S, H, V)), ("beta", beta, (B, S, H)), ("state", state, (B, H, K, V))):
        _check(name, x, shape)
    if K % 64 or V % BLOCK_V:
        raise ValueError(f"decode kernel needs K and V multiples of 64, got K={K} V={V}")
    bk, bvv = beta[..., None] * k, beta[..., None] * v
    decay = jnp.exp(g)

    def body(q_ref, k_ref, bk_ref, bv_ref, d_ref, s_ref, o_ref, o_smem):
        vt, h, b = lax.axis_index("v"), lax.axis_index("h"), lax.axis_index("b")
        cols = pl.ds(vt * BLOCK_V, BLOCK_V)
        rows = lambda ref, t: lax.broadcast_in_dim(
            plgpu.load(ref.at[b, t, h], layout=_ROW, optimized=False), (K, BLOCK_V), [0])
        st = plgpu.load(s_ref.at[b, h, :, cols], layout=_WG, optimized=False)
        for t in range(S):  # few tokens: unrolled, the tile stays in registers
            st = rows(d_ref, t) * st
            kst = jnp.sum(rows(bk_ref, t) * st, axis=0)
            vn = plgpu.load(bv_ref.at[b, t, h, cols], layout=_COL, optimized=False) - kst
            st = st + rows(k_ref, t) * lax.broadcast_in_dim(vn, (K, BLOCK_V), [1])
            o_smem.at[t][...] = scale * jnp.sum(rows(q_ref, t) * st, axis=0)
        s_ref.at[b, h, :, cols][...] = st
        plgpu.commit_smem()
        for t in range(S):
            plgpu.copy_smem_to_gmem(o_smem.at[t], o_ref.at[b, t, h, cols])
        plgpu.wait_smem_to_gmem(0)

    state_ref = jax.new_ref(state)
    o = _kernel(body, name="kda_decode_step", interpret=interpret, grid=(V // BLOCK_V, H, B),
                grid_names=("v", "h", "b"), out_type=jax.ShapeDtypeStruct((B, S, H, V), _F32),
                scratch_types=[plgpu.SMEM((S, BLOCK_V), _F32)])(q, k, bk, bvv, decay, state_ref)
    return o, state_ref[...]
