"""KDA decode step as a Pallas Mosaic GPU kernel: a few tokens against a float32 state, in place.

Decode is bound by state traffic: per token and value head the recurrence (kda_spec §6.2)

    S ← Diag(e^{g}) S;   Vn = β v − β kᵀS;   S ← S + k ⊗ Vn;   o = s qᵀS

touches the whole ``[K, V]`` float32 state (128 KB at K = V = 128) and little else. XLA runs it
as several fusions that each read the state; this kernel reads each state tile once, applies
all the new tokens with the tile in registers and writes it back once, into the same buffer:
the state enters the kernel as a mutable ``jax.Ref``, so with the caller's state donated the
update is in place (no second state buffer).

Work unit: a tile ``[K, 64]`` of one value head's state (64 value columns). A grid of
``CTAS_PER_SM`` × (number of SMs) CTAs of one warpgroup (fewer are resident: each holds its ring)
each walks a contiguous run of tiles through a ``stages``-deep ring of shared-memory buffers: the
tile, its head's row vectors (e^{g}, β·k, k, q) and column vectors (β·v, q·k) arrive by TMA
``stages − 2`` tiles ahead of the one being computed, the updated tile and its outputs leave by
TMA from the buffer they came in (the tile is in registers by then), and a buffer is refilled only
after its store has been read out, two tiles later — loads, compute and stores of neighbouring
tiles overlap.

Per token the two reductions over K share one pass: with S' = e^{g}⊙S,
``kᵀS'`` gives Vn and ``qᵀS_new = qᵀS' + (q·k) Vn`` gives o, so the tile is swept once per
token for both. β is folded into k and v outside (no scalar loads); q·k comes from XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kda_jax.kernels.state_pass import _F32, _ROW, _WG, BLOCK_V, _kernel, _tiled, check_operand

_COL = plgpu.Layout.WGMMA.reduce(0)  # a vector over V (the columns of the state tile)
STAGES = 4  # shared-memory ring depth: stages − 2 tile loads in flight, one store draining
CTAS_PER_SM = 4  # 512 CTAs at B = 64, H = 32: 0.108 vs 0.111 ms for 1 per SM (H100, NOTES.md)
_SMEM_BUDGET = 200 * 1024  # bytes of ring per CTA (an H100 CTA may have 227 KB)
_H100_SMS = 132


def _check(name, x, shape):
    check_operand("decode kernel", name, x, shape, _F32)


def _num_sms():
    dev = jax.devices()[0]
    return getattr(dev, "core_count", None) or _H100_SMS


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "stages", "max_programs"))
def decode_step(q, k, v, g, beta, state, *, scale, interpret=False, stages=None, max_programs=None):
    """(o ``[B, S, H, V]`` float32, new state) for float32 canonical inputs with value heads
    expanded: q, k, g ``[B, S, H, K]``, v ``[B, S, H, V]``, beta ``[B, S, H]``, state ``[B, H, K, V]``
    (written in place when the caller's jit donates it). K and V multiples of 64. ``stages`` and
    ``max_programs`` (CTAs; default ``CTAS_PER_SM`` per SM) override the module's settings."""
    B, S, H, K = q.shape
    V = v.shape[-1]
    for name, x, shape in (("q", q, (B, S, H, K)), ("k", k, (B, S, H, K)), ("g", g, (B, S, H, K)),
                           ("v", v, (B, S, H, V)), ("beta", beta, (B, S, H)), ("state", state, (B, H, K, V))):
        _check(name, x, shape)
    if K % 64 or V % BLOCK_V:
        raise ValueError(f"decode kernel needs K and V multiples of 64, got K={K} V={V}")
    per_stage = 4 * (K * BLOCK_V + 4 * S * K + 3 * S * BLOCK_V)
    stages = stages or max(3, min(STAGES, _SMEM_BUDGET // per_stage))  # 8 tokens at K = 128: 3
    if stages < 3:
        raise ValueError(f"decode kernel needs stages >= 3 (one computing, one draining, one loading), got {stages}")
    # per (b, h): rows [4, S, K] = (e^g, β·k, k, q) and columns [2, S, V] = (β·v, q·k broadcast)
    heads_first = lambda x: jnp.moveaxis(x, 1, 2)  # [B, S, H, X] -> [B, H, S, X]
    rows = jnp.stack([heads_first(x) for x in (jnp.exp(g), beta[..., None] * k, k, q)], axis=2)
    qk = jnp.broadcast_to(jnp.sum(q * k, axis=-1, keepdims=True), v.shape)
    cols_in = jnp.stack([heads_first(beta[..., None] * v), heads_first(qk)], axis=2)

    nv = V // BLOCK_V
    tiles = B * H * nv
    steps = -(-tiles // (max_programs or CTAS_PER_SM * _num_sms()))  # tiles per CTA
    programs = -(-tiles // steps)
    lookahead = stages - 2

    def body(rows_ref, cols_ref, s_ref, o_ref, st_s, rw_s, cl_s, o_s, bars):
        first = lax.axis_index("p") * steps
        count = jnp.minimum(steps, tiles - first)

        def coords(i):
            t = first + i
            bh, vt = t // nv, t % nv
            return bh // H, bh % H, pl.ds(vt * BLOCK_V, BLOCK_V)

        def fetch(i):
            slot, (b, h, c) = i % stages, coords(i)
            bar = bars.at[slot]
            plgpu.copy_gmem_to_smem(s_ref.at[b, h, :, c], st_s.at[slot], bar)
            plgpu.copy_gmem_to_smem(rows_ref.at[b, h], rw_s.at[slot], bar)
            plgpu.copy_gmem_to_smem(cols_ref.at[b, h, :, :, c], cl_s.at[slot], bar)

        for i in range(lookahead):
            @pl.when(i < count)
            def _():
                fetch(i)

        @pl.loop(0, count)
        def _(i):
            slot, (b, h, c) = i % stages, coords(i)

            @pl.when(i + lookahead < count)
            def _():
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the stores of tile i − 2 have left its buffer
                fetch(i + lookahead)

            plgpu.barrier_wait(bars.at[slot])
            row = lambda r, t: lax.broadcast_in_dim(
                plgpu.load(rw_s.at[slot, r, t], layout=_ROW, optimized=False), (K, BLOCK_V), [0])
            col = lambda r, t: plgpu.load(cl_s.at[slot, r, t], layout=_COL, optimized=False)
            st = plgpu.load(st_s.at[slot], layout=_WG)
            for t in range(S):  # few tokens: unrolled, the tile stays in registers
                st = row(0, t) * st
                kst = jnp.sum(row(1, t) * st, axis=0)
                qst = jnp.sum(row(3, t) * st, axis=0)
                vn = col(0, t) - kst
                st = st + row(2, t) * lax.broadcast_in_dim(vn, (K, BLOCK_V), [1])
                o_s.at[slot, t][...] = scale * (qst + col(1, t) * vn)
            st_s.at[slot][...] = st
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(st_s.at[slot], s_ref.at[b, h, :, c], commit_group=False)
            plgpu.copy_smem_to_gmem(o_s.at[slot], o_ref.at[b, h, :, c], commit_group=False)
            plgpu.commit_smem_to_gmem_group()

        plgpu.wait_smem_to_gmem(0)

    scratch = (_tiled((stages, K, BLOCK_V), _F32), plgpu.SMEM((stages, 4, S, K), _F32),
               plgpu.SMEM((stages, 2, S, BLOCK_V), _F32), plgpu.SMEM((stages, S, BLOCK_V), _F32),
               plgpu.Barrier(num_arrivals=3, num_barriers=stages))
    state_ref = jax.new_ref(state)
    o = _kernel(body, name="kda_decode_step", interpret=interpret, grid=(programs,), grid_names=("p",),
                out_type=jax.ShapeDtypeStruct((B, H, S, V), _F32), scratch_types=scratch)(rows, cols_in, state_ref)
    return jnp.moveaxis(o, 2, 1), state_ref[...]
