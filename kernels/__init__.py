"""GPU kernels of kda-jax (Pallas Mosaic GPU, H100), registered with ``kda_jax.ops.kda``.

``mosaic``: chunked KDA whose serial state passes and exact diagonal sub-blocks run as Mosaic
GPU kernels (``kda.py``, ``state_pass.py``, ``intra.py``). Its ``supports`` predicate accepts
exactly the envelope the GPU tests cover (tests/kernels); anything else falls back to ``chunked``
under ``impl="auto"``.
The decode step (``decode.py``, taken by ``kda_jax.ops.kda_decode``) and the decode-sized MoE
expert products (``gathered.py``, taken by ``kda_jax.layers.moe``) have their own ``*_supports``
predicates and switches below. Pallas is imported only when a kernel is first called.
"""

from __future__ import annotations

import jax.numpy as jnp

from kda_jax.ops import registry

# The GPU tests of this envelope (tests/kernels, ``-m gpu``) passed on an H100 at commit 668c2ca,
# and the kernel path is faster than ``chunked`` there (benchmarks/NOTES.md), so ``auto`` takes it.
MOSAIC_AUTO = True


# Under a multi-device mesh ``kda(...)`` can run the kernels per shard (``kda_jax.ops.sharded``,
# shard_map over batch rows and heads; checked on 8 CPU devices with ``chunked`` in its place,
# tests/ops/test_sharded.py). ``test_gpu_sharded_matches_float64_recurrence`` passed on two H100s
# at commit eec2f5f and on two H200s at 1275933 (batch rows over ``data``, then heads over ``tensor``;
# with the decode kernel's sharded test), so ``auto`` takes the
# kernels per shard under such meshes; False sends those calls back to ``chunked``.
MOSAIC_SHARDED = True


# Head sizes (K, V) of the kernels' GPU tests (tests/kernels/test_mosaic.py GPU_SHAPES); K ≠ V runs
# in interpret mode but has not run compiled, so ``auto`` leaves it to ``chunked``.
MOSAIC_KV = ((64, 64), (128, 128))


def mosaic_supports(call: registry.Call) -> str | None:
    """None when the Mosaic kernels can run ``call``, else the reason they cannot."""
    if call.backend != "gpu":
        return f"needs a GPU backend, got {call.backend}"
    if call.sharded and not MOSAIC_SHARDED:
        return "one shard of a multi-device mesh, and the per-shard path is switched off (MOSAIC_SHARDED)"
    if call.num_devices != 1:  # pallas_call has no SPMD partitioning rule: a sharded batch would be gathered
        return (f"{call.num_devices} devices and no context mesh: the kernels run on one device, or per shard "
                "under jax.set_mesh")
    if call.chunk_size != 64:
        return f"needs chunk_size 64, got {call.chunk_size}"
    if (call.K, call.V) not in MOSAIC_KV:
        return f"needs (K, V) in {MOSAIC_KV} (the head sizes its GPU tests cover), got K={call.K} V={call.V}"
    if call.qkv_dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        return f"needs bf16 or float32 q/k/v, got {call.qkv_dtype}"
    return None


def _kda_mosaic(*args, **kwargs):
    from kda_jax.kernels.kda import kda_mosaic

    return kda_mosaic(*args, **kwargs)


# floors_gate: ``kda`` hands it g before the gate floor, which ``MosaicPasses.gate_cumsum`` applies
registry.register("mosaic", _kda_mosaic, mosaic_supports, priority=10, auto=MOSAIC_AUTO, per_shard=True,
                  floors_gate=True)

# The decode kernel's GPU tests (tests/kernels/test_decode_kernel.py, ``-m gpu``) passed on an H100
# at commit 69be20d (v1) and again for v2 (6839fc4), and it beats the XLA path there
# (benchmarks/NOTES.md): ``auto`` takes it.
DECODE_AUTO = True
# Below this many states (batch × value heads) ``auto`` runs the XLA step instead: at batch 1 of the
# 653M model (16 states of 64 KB per layer) the two take the same device time (H100, commit c5c91df:
# 2.765 vs 2.775 ms per model step), but each kernel is a separate launch outside XLA's command
# buffers, and with the MoE kernels too the batch-1 step became bound by the host's launches
# (benchmarks/NOTES.md, "Decode step: host-bound"). From 64 states up state traffic dominates
# (the kernel's regime: 1.2× XLA at 2048 states).
DECODE_MIN_STATES = 64


# ``kda_decode`` under a multi-device context mesh runs the kernel per shard (``kda_jax.ops.sharded``,
# batch rows and heads split as for ``kda``); checked on 8 CPU devices with a stand-in
# (tests/ops/test_sharded.py) and, compiled, by ``test_gpu_decode_sharded_matches_float64_recurrence``
# on two H200s (commit 3164a5e). Off, ``auto`` takes the XLA step under such meshes.
DECODE_SHARDED = True


# Head sizes (K, V) of the decode kernel's GPU tests (tests/kernels/test_decode_kernel.py).
DECODE_KV = ((64, 64), (128, 128), (64, 128))


def decode_supports(K: int, V: int, tokens: int, backend: str, num_devices: int, sharded: bool = False) -> str | None:
    """None when the decode kernel can run the call, else the reason it cannot; ``sharded``: the
    call is one shard of a context mesh (``num_devices`` is then 1)."""
    if backend != "gpu":
        return f"needs a GPU backend, got {backend}"
    if sharded and not DECODE_SHARDED:
        return "one shard of a multi-device mesh, and the per-shard decode path is switched off (DECODE_SHARDED)"
    if num_devices != 1:
        return (f"{num_devices} devices and no context mesh: the kernel runs on one device, or per shard "
                "under jax.set_mesh")
    if (K, V) not in DECODE_KV:
        return f"needs (K, V) in {DECODE_KV} (the head sizes its GPU tests cover), got K={K} V={V}"
    if not 1 <= tokens <= 8:
        return f"needs 1 to 8 tokens per call, got {tokens}"
    return None


# The gathered-expert kernel (``gathered.py``, decode-sized MoE calls): its GPU tests
# (tests/kernels/test_gathered_kernel.py, ``-m gpu``) passed on an H200 (commit 75bd17e, one weight
# per call) and on an H100 (91d73d1, the up and gate projections in one call), and it beats XLA's
# gather + GEMM on both (benchmarks/moe_decode_forms.py; benchmarks/NOTES.md): ``auto`` takes it.
GATHERED_AUTO = True


def gathered_supports(rows: int, d_in: int, d_out: int, a_dtype, w_dtype, backend: str, num_devices: int,
                      ) -> str | None:
    """None when ``gathered.expert_rows`` can run ``a [rows, d_in] @ w[idx] [d_in, d_out]``, else why not."""
    if backend != "gpu":
        return f"needs a GPU backend, got {backend}"
    if num_devices != 1:
        return f"single-device programs only (no partitioning rule yet), got {num_devices} devices"
    if jnp.dtype(a_dtype) != jnp.bfloat16 or jnp.dtype(w_dtype) != jnp.bfloat16:
        return f"needs bf16 inputs and weights, got {jnp.dtype(a_dtype)} and {jnp.dtype(w_dtype)}"
    if d_in % 64 or d_out % 64:
        return f"needs both matrix dimensions multiples of 64, got {d_in} x {d_out}"
    if not 1 <= rows <= 256:
        return f"needs 1 to 256 rows (decode-sized calls), got {rows}"
    return None
