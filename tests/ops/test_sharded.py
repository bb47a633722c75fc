"""``kda(...)`` under a multi-device mesh: a per-shard implementation runs in ``jax.shard_map`` over
batch rows and heads (``kda_jax.ops.sharded``), on 8 fake CPU devices. ``chunked`` stands in for a
GPU kernel (registered per-shard here): outputs, final state and all gradients must equal the
unsharded call, and the implementation must see one shard's shapes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from kda_jax.models.sharding import LOGICAL_RULES, MESH_AXES
from kda_jax.ops import kda, kda_chunked, registry, sharded
from tests.ops.helpers import GRAD_NAMES, cotangents, decode_inputs, make_inputs, value_and_grads

SEEN = []


def _per_shard(q, k, v, g, beta, **kw):
    SEEN.append((q.shape, v.shape, None if kw["initial_state"] is None else kw["initial_state"].shape))
    return kda_chunked(q, k, v, g, beta, **kw)


def _one_shard_only(call):
    if not call.sharded or call.num_devices != 1:
        return f"needs one shard of a mesh, got sharded={call.sharded}, {call.num_devices} devices"
    return None


@pytest.fixture
def per_shard_impl():
    registry.register("test_per_shard", _per_shard, _one_shard_only, priority=50, auto=False, per_shard=True)
    SEEN.clear()
    yield "test_per_shard"
    registry.unregister("test_per_shard")


def _mesh(data, fsdp, tensor, expert=1):
    return jax.make_mesh((data, fsdp, tensor, expert), MESH_AXES, axis_types=(AxisType.Auto,) * 4,
                         devices=jax.devices()[: data * fsdp * tensor * expert])


def test_axes_follow_the_logical_rules():
    assert sharded.BATCH_AXES == LOGICAL_RULES["batch"]
    assert sharded.HEAD_AXIS == LOGICAL_RULES["heads"]


def test_plan_splits_what_divides():
    assert sharded.plan(4, 2, 4) is None  # no context mesh
    with jax.set_mesh(_mesh(2, 2, 2)):
        sp = sharded.plan(4, 2, 4)
        assert (sp.batch, sp.heads, sp.batch_shards, sp.head_shards) == (("data", "fsdp"), "tensor", 4, 2)
        sp = sharded.plan(6, 3, 6)  # 6 rows: only one batch axis divides; 3 heads: not split
        assert (sp.batch, sp.heads) == (("data",), None)
        sp = sharded.plan(3, 2, 2)
        assert (sp.batch, sp.heads) == ((), "tensor")
    with jax.set_mesh(_mesh(1, 1, 1)):
        assert sharded.plan(4, 2, 4) is None


def test_per_shard_impl_equals_the_unsharded_call(per_shard_impl):
    """B = 4 over data × fsdp, H = 2 / HV = 4 (grouped values) over tensor; documents and h0."""
    x = make_inputs(4, 100, 2, 4, 16, 16, gate="strong", seed=7)
    seg = jnp.asarray(np.cumsum(np.random.default_rng(0).random((4, 100)) < 0.03, axis=1), jnp.int32)
    do, dS = cotangents((4, 100, 4, 16), (4, 4, 16, 16))

    def fn(impl):
        return lambda q, k, v, g, beta, h0: kda(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                segment_ids=seg, impl=impl)

    want = value_and_grads(jax.jit(fn("chunked")), x, do, dS)
    with jax.set_mesh(_mesh(2, 2, 2)):
        got = value_and_grads(jax.jit(fn(per_shard_impl)), x, do, dS)
    assert SEEN and all(s == ((1, 100, 1, 16), (1, 100, 2, 16), (1, 2, 16, 16)) for s in SEEN), SEEN
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
    for n in GRAD_NAMES:
        np.testing.assert_allclose(got[2][n], want[2][n], rtol=1e-5, atol=1e-5, err_msg=n)


def test_per_shard_impl_is_judged_on_the_shard(per_shard_impl):
    x = make_inputs(2, 64, 2, 2, 16, 16, seed=1, h0=False)
    args = [x[n] for n in ("q", "k", "v", "g", "beta")]
    with pytest.raises(ValueError, match="needs one shard of a mesh"):
        kda(*args, impl=per_shard_impl)  # no mesh: the whole call on an 8-device process
    with jax.set_mesh(_mesh(2, 1, 2)):
        o, _ = jax.jit(lambda *a: kda(*a, impl=per_shard_impl))(*args)
    np.testing.assert_allclose(o, kda(*args, impl="chunked")[0], rtol=1e-5, atol=1e-5)
    # auto judges the GPU kernels on one shard's call (the whole call, on 4 devices, they refuse)
    call = registry.Call(B=2, T=64, H=2, HV=2, K=128, V=128, qkv_dtype=jnp.dtype(jnp.bfloat16), chunk_size=64,
                         has_segments=False, has_initial_state=False, backend="gpu", num_devices=4)
    shard = dataclasses.replace(call, B=1, H=1, HV=1, num_devices=1, sharded=True)
    assert registry.select("auto", call, shard).name == "mosaic"
    assert registry.select("auto", call).name == "chunked"


# ---------------------------------------------------------------------------------------------
# kda_decode per shard


@pytest.mark.parametrize("mesh_shape", [(2, 1, 2), (2, 2, 1), (1, 1, 2)], ids=["data-tensor", "data-fsdp", "tensor"])
def test_decode_kernel_runs_per_shard(monkeypatch, mesh_shape):
    """With the kernel allowed per shard, ``kda_decode`` under a mesh hands each device one shard's
    rows and heads (GVA kept with their q/k head) and the result equals the unsharded XLA step.
    The XLA step on the kernel's operands stands in for the kernel (interpret mode keeps one
    simulated GPU per process and cannot run on several devices at once)."""
    import kda_jax.kernels as kernels
    import kda_jax.kernels.decode as decode_mod
    from kda_jax.ops import kda_decode
    from kda_jax.ops.decode import decode_canonical

    def stand_in(q, k, v, g, beta, state, *, scale):
        seen.append((q.shape, state.shape))
        return decode_canonical(q, k, v, g, beta, scale=scale, state=state)

    seen = []
    monkeypatch.setattr(kernels, "DECODE_SHARDED", True)
    monkeypatch.setattr(kernels, "decode_supports", lambda *a, sharded=False: None if sharded else "unsharded")
    monkeypatch.setattr(decode_mod, "decode_step", stand_in)
    x = decode_inputs(4, 2, 2, 4, 64, 64, seed=sum(mesh_shape))
    want = kda_decode(*x, impl="xla")
    with jax.set_mesh(_mesh(*mesh_shape)):
        got = jax.jit(lambda *a: kda_decode(*a, impl="mosaic"))(*x)
    nb, nh = mesh_shape[0] * mesh_shape[1], mesh_shape[2]
    assert seen == [((4 // nb, 2, 4 // nh, 64), (4 // nb, 4 // nh, 64, 64))]
    for name, a, b in zip(("o", "state"), got, want):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5, err_msg=name)


def test_decode_auto_counts_states_per_device(monkeypatch):
    """``auto`` takes the kernel per shard only from DECODE_MIN_STATES states per device, and never
    while DECODE_SHARDED is off."""
    import kda_jax.kernels as kernels
    import kda_jax.kernels.decode as decode_mod
    from kda_jax.ops import kda_decode

    calls = []
    monkeypatch.setattr(kernels, "decode_supports",
                        lambda *a, sharded=False: None if kernels.DECODE_SHARDED or not sharded else "off")
    monkeypatch.setattr(decode_mod, "decode_step", lambda q, *a, **kw: calls.append(q.shape) or (q * 0, a[-1]))
    monkeypatch.setattr(kernels, "DECODE_MIN_STATES", 8)
    x = decode_inputs(4, 1, 2, 4, 64, 64)  # 16 states: 4 per device on a 2 × 2 mesh
    with jax.set_mesh(_mesh(2, 1, 2)):
        monkeypatch.setattr(kernels, "DECODE_SHARDED", True)
        kda_decode(*x, impl="auto")
        assert calls == []  # 4 states per device < 8: the XLA step
        monkeypatch.setattr(kernels, "DECODE_MIN_STATES", 4)
        kda_decode(*x, impl="auto")
        assert calls == [(2, 1, 2, 64)]
        monkeypatch.setattr(kernels, "DECODE_SHARDED", False)
        kda_decode(*x, impl="auto")
        assert len(calls) == 1
