"""kda_jax.ops.chunked against the float64 recurrence: outputs, final state and every gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kda_jax.ops import kda, kda_chunked, kda_reference
from kda_jax.ops.inputs import resets_from_segment_ids
from tests.ops.helpers import GRAD_NAMES, check_against_oracle, make_inputs, oracle, value_and_grads


def _chunked(C, resets=None, scale=None):
    def fn(q, k, v, g, beta, h0):
        s = q.shape[-1] ** -0.5 if scale is None else scale
        return kda_chunked(q, k, v, g, beta, scale=s, initial_state=h0, resets=resets, chunk_size=C)
    return fn


# (B, T, H, HV, K, V, C): T = 1, 63, 500, 1000; K = V = 60, 100; K != V; GVA; C = 32 and 64
SHAPES = [
    (1, 1, 1, 1, 32, 32, 64),
    (1, 63, 1, 1, 64, 64, 64),
    (2, 500, 3, 3, 60, 60, 64),
    (1, 1000, 2, 2, 100, 100, 32),
    (2, 160, 2, 4, 64, 64, 32),
    (1, 200, 1, 3, 48, 80, 64),
    (1, 130, 2, 2, 128, 128, 64),
]


# bf16 inputs only round q, k, v before the same float32 algorithm, so in the default suite bf16 runs
# at three shapes (T = 63; GVA with C = 32; K = V = 128) and the rest are ``slow`` (suite budget)
_BF16_DEFAULT = {(1, 63), (2, 160), (1, 130)}


def _shape_dtype_cases():
    """Every shape in float32 and bf16. ``slow``: the 2 × 500 float32 case (~30 s; float32 at long T
    and odd K is covered by T = 1000, K = 100) and bf16 outside ``_BF16_DEFAULT``."""
    for shape in SHAPES:
        sid = "B{}T{}H{}HV{}K{}V{}C{}".format(*shape)
        for dtype, did in ((jnp.float32, "f32"), (jnp.bfloat16, "bf16")):
            slow = shape[:2] == (2, 500) if did == "f32" else shape[:2] not in _BF16_DEFAULT
            yield pytest.param(shape, dtype, id=f"{sid}-{did}", marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("shape,dtype", list(_shape_dtype_cases()))
def test_matches_float64_recurrence(shape, dtype):
    *dims, C = shape
    x = make_inputs(*dims, dtype=dtype, seed=sum(shape))
    check_against_oracle(_chunked(C), x, label=f"{shape} {dtype.__name__}")


@pytest.mark.parametrize("gate", ["strong", "zero"])
@pytest.mark.parametrize("C", [32, 64])
def test_gates_strong_and_zero(gate, C):
    x = make_inputs(2, 300, 2, 2, 64, 32, gate=gate, seed=7)
    check_against_oracle(_chunked(C), x, label=f"{gate} C={C}")


def test_float64_is_exact():
    """In float64 the chunkwise algorithm equals the recurrence to rounding (kda_spec §0)."""
    x = {n: jnp.asarray(a, jnp.float64) for n, a in make_inputs(2, 150, 2, 4, 40, 24, gate="strong", seed=3).items()}
    (o_ref, S_ref, g_ref), (do, dS) = oracle(x)
    o, S, grads = value_and_grads(_chunked(64), x, do, dS)
    np.testing.assert_allclose(o, o_ref, atol=1e-10, rtol=1e-9)
    np.testing.assert_allclose(S, S_ref, atol=1e-10, rtol=1e-9)
    for n in GRAD_NAMES:
        np.testing.assert_allclose(grads[n], g_ref[n], atol=1e-9, rtol=1e-8, err_msg=n)


def test_scale_argument():
    x = make_inputs(1, 100, 2, 2, 32, 32, seed=11)
    check_against_oracle(_chunked(64, scale=0.1), x, scale=0.1, label="scale=0.1")


# ---------------------------------------------------------------------------------------------
# packed documents


def _segments(T, bounds):
    seg = np.zeros(T, np.int32)
    for b in bounds:
        seg[b:] += 1
    return seg


@pytest.mark.parametrize("bounds", [[37, 64, 65, 150], [64, 128], [1, 2, 3, 100]], ids=["inside", "edges", "short"])
@pytest.mark.parametrize("C", [32, 64])
def test_segments_match_separate_documents(bounds, C):
    """Packed rows give the outputs, final state and gradients of running each document alone."""
    T, H, HV, K, V = 200, 1, 2, 32, 16
    x = {n: a.astype(jnp.float64) for n, a in make_inputs(1, T, H, HV, K, V, gate="strong", seed=5).items()}
    resets = resets_from_segment_ids(jnp.asarray(_segments(T, bounds))[None])
    do = jnp.asarray(np.random.default_rng(2).standard_normal((1, T, HV, V)))
    dS = jnp.asarray(np.random.default_rng(3).standard_normal((1, HV, K, V)))

    def packed(q, k, v, g, beta, h0):  # float64 end to end, so any mismatch is a real one
        o, S = _chunked(C, resets=resets)(q, k, v, g, beta, h0)
        return jnp.sum(o * do) + jnp.sum(S * dS), (o, S)

    def separate(q, k, v, g, beta, h0):
        edges = [0, *bounds, T]
        outs, S = [], h0
        for d, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
            sl = lambda t: t[:, a:b]
            o, S = kda_reference(sl(q), sl(k), sl(v), sl(g), sl(beta), scale=K**-0.5,
                                 initial_state=S if d == 0 else jnp.zeros_like(S))
            outs.append(o)
        o = jnp.concatenate(outs, axis=1)
        return jnp.sum(o * do) + jnp.sum(S * dS), (o, S)

    args = tuple(x[n] for n in GRAD_NAMES)
    g1, (o1, S1) = jax.grad(packed, argnums=range(6), has_aux=True)(*args)
    g2, (o2, S2) = jax.grad(separate, argnums=range(6), has_aux=True)(*args)
    np.testing.assert_allclose(o1, o2, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(S1, S2, rtol=1e-9, atol=1e-10)
    for n, a, b in zip(GRAD_NAMES, g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-9, err_msg=f"d{n}")


def test_front_door_segment_ids():
    """kda(segment_ids=...) restarts the state exactly like explicit resets."""
    x = make_inputs(2, 100, 1, 1, 32, 32, seed=12)
    seg = jnp.asarray(np.stack([_segments(100, [30]), _segments(100, [5, 64])]))
    resets = resets_from_segment_ids(seg)
    check_against_oracle(
        lambda q, k, v, g, beta, h0: kda(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                         segment_ids=seg, impl="chunked"),
        x, resets=resets, label="segment_ids")


def test_segments_with_gva_bf16_and_padding():
    x = make_inputs(2, 150, 2, 4, 64, 64, dtype=jnp.bfloat16, gate="strong", seed=9)
    seg = np.stack([_segments(150, [10, 70, 71]), _segments(150, [64, 140])])
    resets = resets_from_segment_ids(jnp.asarray(seg))
    check_against_oracle(_chunked(64, resets=resets), x, resets=resets, label="segments bf16 gva")


# ---------------------------------------------------------------------------------------------
# causality, finiteness, transformations


def test_causality():
    """Changing inputs at t >= t0 changes neither outputs before t0 nor gradients of inputs before t0."""
    T, t0 = 160, 70
    x = make_inputs(1, T, 2, 2, 32, 32, gate="strong", seed=21)
    y = make_inputs(1, T, 2, 2, 32, 32, gate="strong", seed=22)
    mixed = {n: (x[n] if n == "h0" else x[n].at[:, t0:].set(y[n][:, t0:])) for n in GRAD_NAMES}
    do = jnp.asarray(np.random.default_rng(0).standard_normal((1, t0, 2, 32)), jnp.float32)

    def prefix_loss(q, k, v, g, beta, h0):
        o, _ = kda_chunked(q, k, v, g, beta, scale=32**-0.5, initial_state=h0, chunk_size=64)
        return jnp.sum(o[:, :t0] * do), o

    ga, oa = jax.grad(prefix_loss, argnums=range(6), has_aux=True)(*(x[n] for n in GRAD_NAMES))
    gb, ob = jax.grad(prefix_loss, argnums=range(6), has_aux=True)(*(mixed[n] for n in GRAD_NAMES))
    np.testing.assert_array_equal(np.asarray(oa[:, :t0]), np.asarray(ob[:, :t0]))
    for n, a, b in zip(GRAD_NAMES, ga, gb):
        a, b = np.asarray(a), np.asarray(b)
        if n == "h0":
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        else:
            np.testing.assert_allclose(a[:, :t0], b[:, :t0], rtol=1e-6, atol=1e-7, err_msg=n)
            assert not np.any(a[:, t0:]) and not np.any(b[:, t0:]), f"d{n} nonzero after t0"


def test_jit_vmap_and_no_recompilation():
    x = make_inputs(2, 90, 2, 2, 32, 32, seed=4)
    f = jax.jit(lambda q, k, v, g, beta, h0: kda(q, k, v, g, beta, initial_state=h0, output_final_state=True))
    args = tuple(x[n] for n in GRAD_NAMES)
    o1, _ = f(*args)
    o2, _ = f(*(a + 0 for a in args))
    assert f._cache_size() == 1
    np.testing.assert_array_equal(o1, o2)
    # vmap over a leading axis equals the batched call
    per = jax.vmap(lambda q, k, v, g, beta, h0: kda(q[None], k[None], v[None], g[None], beta[None],
                                                    initial_state=h0[None])[0][0])(*args)
    np.testing.assert_allclose(per, o1, rtol=1e-5, atol=1e-6)
