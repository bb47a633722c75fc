"""The kda(...) front door: argument errors, in-op gate / β logits / L2 norm, GDN, dispatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kda_jax.ops import gdn, kda, kda_reference, registry
from tests.ops.helpers import assert_close, make_inputs

B, T, H, HV, K, V = 1, 70, 2, 4, 32, 16


def _x(**kw):
    return make_inputs(B, T, H, HV, K, V, **kw)


@pytest.mark.parametrize("mutate, kind, match", [
    (dict(q=jnp.zeros((B, T, H))), ValueError, "q must have rank 4"),
    (dict(k=jnp.zeros((B, T + 1, H, K))), ValueError, "k must have shape"),
    (dict(v=jnp.zeros((B, T, 3, V))), ValueError, "multiple of H"),
    (dict(v=jnp.zeros((2, T, HV, V))), ValueError, "v must have shape"),
    (dict(g=jnp.zeros((B, T, HV, K + 1))), ValueError, "g must have shape"),
    (dict(beta=jnp.zeros((B, T, H))), ValueError, "beta must have shape"),
    (dict(q=jnp.zeros((B, T, H, K), jnp.int32)), TypeError, "q must have a floating dtype"),
    (dict(initial_state=jnp.zeros((B, HV, K, V + 1))), ValueError, "initial_state must have shape"),
    (dict(segment_ids=jnp.zeros((B, T), jnp.float32)), TypeError, "segment_ids must be an integer"),
    (dict(segment_ids=jnp.zeros((B, T - 1), jnp.int32)), ValueError, "segment_ids must have shape"),
    (dict(chunk_size=16), ValueError, "chunk_size must be one of"),
    (dict(impl="triton"), ValueError, "impl must be 'auto' or one of"),
    (dict(A_log=jnp.zeros((H,))), ValueError, "A_log must have shape"),
    (dict(A_log=jnp.zeros((HV,)), dt_bias=jnp.zeros((HV,))), ValueError, r"dt_bias must have shape \[HV \* K\]"),
    (dict(dt_bias=jnp.zeros((HV * K,))), ValueError, "pass A_log as well"),
])
def test_errors_name_the_argument(mutate, kind, match):
    x = _x()
    args = {n: x[n] for n in ("q", "k", "v", "g", "beta")}
    kwargs = {}
    for n, val in mutate.items():
        (args if n in args else kwargs)[n] = val
    with pytest.raises(kind, match=match):
        kda(**args, **kwargs)


def test_in_op_gate_beta_logits_and_l2norm_with_gradients():
    """kda(A_log=, dt_bias=, beta_is_logit=, use_qk_l2norm=) == the f64 recurrence on inputs
    activated by hand (kda_spec §1.3, §2.4), including gradients w.r.t. the raw inputs."""
    rng = np.random.default_rng(0)
    raw = dict(q=rng.standard_normal((B, T, H, K)), k=rng.standard_normal((B, T, H, K)),
               v=rng.standard_normal((B, T, HV, V)), f=rng.standard_normal((B, T, HV, K)),
               b=rng.standard_normal((B, T, HV)), A_log=np.log(rng.uniform(1, 16, HV)),
               dt_bias=rng.standard_normal(HV * K), h0=rng.standard_normal((B, HV, K, V)))
    raw32 = {n: jnp.asarray(a, jnp.float32) for n, a in raw.items()}
    do = jnp.asarray(rng.standard_normal((B, T, HV, V)))

    def ours(q, k, v, f, b, A_log, dt_bias, h0):
        o, _ = kda(q, k, v, f, b, A_log=A_log, dt_bias=dt_bias, beta_is_logit=True, use_qk_l2norm=True,
                   initial_state=h0, impl="chunked")
        return jnp.sum(o * do)

    def by_hand(q, k, v, f, b, A_log, dt_bias, h0):
        norm = lambda x: x / jnp.sqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-6)
        z = f + dt_bias.reshape(HV, K)
        a = -jnp.exp(A_log)[:, None] * jnp.log1p(jnp.exp(z))
        beta = 1 / (1 + jnp.exp(-b))
        o, _ = kda_reference(norm(q), norm(k), v, a, beta, scale=K**-0.5, initial_state=h0)
        return jnp.sum(o * do)

    names = list(raw)
    g1 = jax.grad(ours, argnums=range(8))(*(raw32[n] for n in names))
    g2 = jax.grad(by_hand, argnums=range(8))(*(raw32[n].astype(jnp.float64) for n in names))
    assert_close("loss", ours(*(raw32[n] for n in names)), by_hand(*(raw32[n].astype(jnp.float64) for n in names)), 1e-5)
    tol = dict(q=0.008, k=0.008, v=0.008, f=0.02, b=0.02, A_log=0.02, dt_bias=0.02, h0=0.008)
    for n, a, b in zip(names, g1, g2):
        assert_close(f"d{n}", a, b, tol[n])


def test_gdn_is_kda_with_a_broadcast_scalar_gate():
    x = _x(seed=3)
    rng = np.random.default_rng(1)
    g_scalar = jnp.asarray(-np.logaddexp(0, rng.standard_normal((B, T, HV))), jnp.float32)
    o1, S1 = gdn(x["q"], x["k"], x["v"], g_scalar, x["beta"], initial_state=x["h0"], output_final_state=True)
    o2, S2 = kda_reference(*(x[n].astype(jnp.float64) for n in ("q", "k", "v")),
                           jnp.broadcast_to(g_scalar[..., None], (B, T, HV, K)).astype(jnp.float64),
                           x["beta"].astype(jnp.float64), scale=K**-0.5, initial_state=x["h0"].astype(jnp.float64))
    assert_close("o", o1, o2, 0.005)
    assert_close("state", S1, S2, 0.005)
    # in-op GDN gate: dt_bias is per head
    A_log, dt = jnp.zeros((HV,)), jnp.ones((HV,))
    o3, _ = gdn(x["q"], x["k"], x["v"], g_scalar, x["beta"], A_log=A_log, dt_bias=dt)
    a = -jax.nn.softplus(g_scalar + dt)
    o4, _ = gdn(x["q"], x["k"], x["v"], a, x["beta"])
    np.testing.assert_allclose(o3, o4, rtol=1e-6, atol=1e-6)


def test_final_state_only_when_asked():
    x = _x()
    assert kda(x["q"], x["k"], x["v"], x["g"], x["beta"])[1] is None


# ---------------------------------------------------------------------------------------------
# registry and fail-closed dispatch


def test_auto_picks_chunked_on_cpu_and_a_supported_kernel_first():
    x = _x()
    args = (x["q"], x["k"], x["v"], x["g"], x["beta"])
    calls = []

    def fake_kernel(q, k, v, g, beta, **kw):
        calls.append(kw)
        return kda_reference(q, k, v, g, beta, **kw)

    only_fp16 = lambda call: None if call.qkv_dtype == jnp.float16 else f"dtype {call.qkv_dtype} untested"
    registry.register("fake_kernel", fake_kernel, only_fp16, priority=0)
    try:
        assert registry.select("auto", registry.describe_call(
            type("C", (), dict(q=x["q"], v=x["v"], resets=None, initial_state=None))(), 64)).name == "chunked"
        kda(*args)  # float32: the kernel's predicate refuses, chunked runs
        assert not calls
        kda(*(a.astype(jnp.float16) if i < 3 else a for i, a in enumerate(args)))
        assert len(calls) == 1
        with pytest.raises(ValueError, match="fake_kernel.*does not support this call: dtype float32 untested"):
            kda(*args, impl="fake_kernel")
    finally:
        registry.unregister("fake_kernel")
    assert registry.names() == ["mosaic", "chunked", "reference"]


def test_gate_floor_applied_once_by_the_front_door_or_the_implementation():
    """``kda`` floors g (``inputs.GATE_FLOOR``) before an implementation, unless it is registered with
    ``floors_gate`` (it then sees −inf and −1000 as given, and applies the floor itself)."""
    from kda_jax.ops.inputs import GATE_FLOOR, apply_gate_floor

    x = _x(seed=3)
    g = np.array(x["g"])
    g[:, 5, :, :3] = -np.inf
    g[:, 9] = -1000.0
    seen = []

    def fake(q, k, v, g, beta, **kw):
        seen.append(float(jnp.min(g)))
        return kda_reference(q, k, v, apply_gate_floor(g) if floors else g, beta, **kw)

    want = kda(x["q"], x["k"], x["v"], jnp.asarray(g), x["beta"], impl="reference")[0]
    for floors in (False, True):
        registry.register("fake", fake, lambda call: None, priority=0, auto=False, floors_gate=floors)
        try:
            o = kda(x["q"], x["k"], x["v"], jnp.asarray(g), x["beta"], impl="fake")[0]
        finally:
            registry.unregister("fake")
        np.testing.assert_array_equal(np.asarray(o), np.asarray(want))
    assert seen == [GATE_FLOOR, -np.inf]


def test_impls_agree():
    x = _x(seed=5)
    args = (x["q"], x["k"], x["v"], x["g"], x["beta"])
    o1, S1 = kda(*args, initial_state=x["h0"], output_final_state=True, impl="reference")
    o2, S2 = kda(*args, initial_state=x["h0"], output_final_state=True, impl="auto", chunk_size=32)
    assert_close("o", o2, o1, 1e-4)
    assert_close("state", S2, S1, 1e-4)


def test_hard_reset_gates_are_safe():
    """g = −inf (α = 0, a hard reset) gives the finite results of any gate below ``GATE_FLOOR`` —
    the chunked forms take differences of in-chunk cumsums, where −inf would make NaN."""
    x = _x(seed=9)
    g = np.array(x["g"])
    g[:, 10, :, :5] = -np.inf
    g[:, 40] = -np.inf
    run = lambda gate, impl: kda(x["q"], x["k"], x["v"], jnp.asarray(gate, jnp.float32), x["beta"],
                                 initial_state=x["h0"], output_final_state=True, impl=impl)
    ref = run(g, "reference")
    for impl in ("chunked", "reference"):
        o, S = run(g, impl)
        assert np.isfinite(o).all() and np.isfinite(S).all(), impl
        for a, b in zip((o, S), run(np.where(np.isinf(g), -1000.0, g), impl)):
            np.testing.assert_array_equal(a, b)
        assert_close(f"{impl} o", o, ref[0], 1e-4)
    grads = jax.grad(lambda *a: jnp.sum(kda(*a, impl="chunked")[0]), argnums=range(5))(
        x["q"], x["k"], x["v"], jnp.asarray(g, jnp.float32), x["beta"])
    assert all(np.isfinite(d).all() for d in grads)
