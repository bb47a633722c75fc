"""The Mosaic GPU decode kernel against the float64 recurrence (interpret mode on CPU; compiled with ``-m gpu``)."""

import jax
import jax.numpy as jnp
import pytest

from kda_jax.kernels import decode_supports
from kda_jax.ops import kda_decode, kda_reference
from tests.ops.helpers import assert_close, decode_inputs


def _oracle(q, k, v, g, beta, state):
    HV = v.shape[2]
    f64 = lambda x: jnp.asarray(x, jnp.float64)
    rep = lambda x: jnp.repeat(x, HV // x.shape[2], axis=2)
    return kda_reference(f64(rep(q)), f64(rep(k)), f64(v), f64(g), f64(beta), scale=q.shape[-1] ** -0.5,
                         initial_state=f64(state))


@pytest.mark.parametrize("B,S,K,V", [(2, 1, 128, 128), (1, 4, 64, 128)], ids=["S1-K128", "S4-K64"])
def test_interpret_matches_float64_recurrence(B, S, K, V):
    from kda_jax.kernels.decode import decode_step

    q, k, v, g, beta, state = decode_inputs(B, S, 2, 2, K, V, seed=S)
    o_ref, s_ref = _oracle(q, k, v, g, beta, state)
    o, s = decode_step(q, k, v, g, beta, state, scale=K**-0.5, interpret=True)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("state", s, s_ref, 1e-5)


@pytest.mark.parametrize("stages,max_programs", [(3, 3), (4, 2), (5, 1)])
def test_interpret_ring_of_buffers(stages, max_programs):
    """Each CTA walks several tiles through the ring (8 tiles over 1 to 3 CTAs, the last CTA's run
    shorter), so loads ahead, buffer reuse after the stores and the tail are all exercised."""
    from kda_jax.kernels.decode import decode_step

    q, k, v, g, beta, state = decode_inputs(2, 2, 2, 2, 64, 128, seed=stages)
    o_ref, s_ref = _oracle(q, k, v, g, beta, state)
    o, s = decode_step(q, k, v, g, beta, state, scale=64**-0.5, interpret=True, stages=stages, max_programs=max_programs)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("state", s, s_ref, 1e-5)


def test_decode_dispatch_is_fail_closed(monkeypatch):
    import kda_jax.kernels as kernels

    assert decode_supports(128, 128, 1, "gpu", 1) is None
    assert "GPU" in decode_supports(128, 128, 1, "cpu", 1)
    assert "no context mesh" in decode_supports(128, 128, 1, "gpu", 2)
    assert decode_supports(128, 128, 1, "gpu", 1, sharded=True) is None
    monkeypatch.setattr(kernels, "DECODE_SHARDED", False)
    assert "DECODE_SHARDED" in decode_supports(128, 128, 1, "gpu", 1, sharded=True)
    monkeypatch.undo()
    assert "K, V" in decode_supports(96, 128, 1, "gpu", 1)
    assert "K, V" in decode_supports(128, 64, 1, "gpu", 1)  # not among the GPU-tested head sizes
    assert "tokens" in decode_supports(128, 128, 16, "gpu", 1)
    if jax.default_backend() != "gpu":
        q, k, v, g, beta, state = decode_inputs(1, 1, 1, 1, 64, 64)
        with pytest.raises(ValueError, match="impl='mosaic' does not support this decode call: needs a GPU"):
            kda_decode(q, k, v, g, beta, state, impl="mosaic")


@pytest.mark.gpu
@pytest.mark.parametrize("S", [1, 3, 8])
@pytest.mark.parametrize("K,V", [(128, 128), (64, 64), (64, 128)])
def test_gpu_matches_float64_recurrence_gva(S, K, V):
    q, k, v, g, beta, state = decode_inputs(3, S, 2, 4, K, V, seed=10 * S + K)
    o_ref, s_ref = _oracle(q, k, v, g, beta, state)
    o, s = kda_decode(q, k, v, g, beta, state, impl="mosaic")
    assert_close("o", o, o_ref, 1e-5)
    assert_close("state", s, s_ref, 1e-5)


@pytest.mark.gpu
def test_gpu_state_updated_in_place_when_donated():
    q, k, v, g, beta, state = decode_inputs(2, 1, 4, 4, 128, 128, seed=3)
    expect = kda_decode(q, k, v, g, beta, state, impl="xla")[1]
    step = jax.jit(lambda st: kda_decode(q, k, v, g, beta, st, impl="mosaic"), donate_argnums=0)
    before = jnp.array(state)
    ptr = before.unsafe_buffer_pointer()
    _, after = step(before)
    assert before.is_deleted()
    assert after.unsafe_buffer_pointer() == ptr, "the new state did not reuse the donated buffer"
    assert_close("state", after, expect, 1e-6)


def test_auto_takes_the_kernel_only_from_decode_min_states(monkeypatch):
    """With the kernel reported supported, ``auto`` calls it for B·HV ≥ DECODE_MIN_STATES and runs
    the XLA step (the float64 recurrence's result) below."""
    import kda_jax.kernels as kernels
    import kda_jax.kernels.decode as decode_mod

    calls = []
    monkeypatch.setattr(kernels, "decode_supports", lambda *a, **kw: None)
    monkeypatch.setattr(decode_mod, "decode_step", lambda q, *a, **kw: calls.append(q.shape) or (q * 0, a[-1]))
    small = decode_inputs(1, 1, 2, 2, 64, 64)
    o, s = kda_decode(*small, impl="auto")
    o_ref, s_ref = _oracle(*small)
    assert calls == []
    assert_close("o", o, o_ref, 1e-5)
    assert_close("state", s, s_ref, 1e-5)
    B = -(-kernels.DECODE_MIN_STATES // 2)
    kda_decode(*decode_inputs(B, 1, 2, 2, 64, 64), impl="auto")
    assert len(calls) == 1 and calls[0][0] == B


@pytest.mark.gpu
@pytest.mark.multi_gpu
@pytest.mark.skipif(jax.device_count() < 2, reason="needs two GPUs (device kind nvidia-h100-x2)")
def test_gpu_decode_sharded_matches_float64_recurrence(monkeypatch):
    """The kernel per shard under two-GPU meshes (batch rows over ``data``, then heads over
    ``tensor``), GVA, −1000 gates, 3 tokens: the condition for turning ``DECODE_SHARDED`` on."""
    from jax.sharding import AxisType

    import kda_jax.kernels as kernels
    from kda_jax.models.sharding import MESH_AXES

    monkeypatch.setattr(kernels, "DECODE_SHARDED", True)
    x = decode_inputs(4, 3, 2, 4, 128, 128, seed=71)
    o_ref, s_ref = _oracle(*x)
    for shape in ((2, 1, 1, 1), (1, 1, 2, 1)):
        mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 4, devices=jax.devices()[:2])
        with jax.set_mesh(mesh):
            step = jax.jit(lambda *a: kda_decode(*a, impl="mosaic"))
            text = step.lower(*x).as_text()
            assert "mosaic_gpu" in text and "manual_computation" in text, "the kernel did not run per shard"
            o, s = step(*x)
        assert_close(f"o {shape}", o, o_ref, 1e-5)
        assert_close(f"state {shape}", s, s_ref, 1e-5)
