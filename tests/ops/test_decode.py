"""kda_decode: few-token recurrent updates continue a chunked prefill exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kda_jax.ops import kda, kda_decode
from tests.ops.helpers import assert_close, make_inputs


@pytest.mark.parametrize("steps", [[1, 1, 1], [3, 2]], ids=["one-token", "few-token"])
def test_prefill_then_decode_equals_one_pass(steps):
    T0, k = 77, sum(steps)
    x = make_inputs(2, T0 + k, 2, 4, 32, 24, dtype=jnp.float32, seed=8)
    args = [x[n] for n in ("q", "k", "v", "g", "beta")]
    o_full, S_full = kda(*args, initial_state=x["h0"], output_final_state=True, impl="reference")
    o_pre, S = kda(*(a[:, :T0] for a in args), initial_state=x["h0"], output_final_state=True, impl="chunked")
    step = jax.jit(kda_decode, donate_argnames="state")
    outs, t = [o_pre], T0
    for s in steps:
        o, S = step(*(a[:, t : t + s] for a in args), S)
        outs.append(o)
        t += s
    o = jnp.concatenate(outs, axis=1)
    assert_close("o", o, o_full, 1e-4)
    assert_close("state", S, S_full, 1e-4)
    np.testing.assert_allclose(o[:, T0:], o_full[:, T0:], rtol=1e-4, atol=1e-5)


def test_decode_with_in_op_gate_and_l2norm_matches_kda():
    rng = np.random.default_rng(0)
    B, S, H, K, V = 3, 2, 2, 16, 16
    q, k = (jnp.asarray(rng.standard_normal((B, S, H, K)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((B, S, H, V)), jnp.float32)
    f = jnp.asarray(rng.standard_normal((B, S, H, K)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((B, S, H)), jnp.float32)
    A_log, dt = jnp.zeros((H,)), jnp.zeros((H * K,))
    state = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32)
    kw = dict(A_log=A_log, dt_bias=dt, beta_is_logit=True, use_qk_l2norm=True)
    o1, S1 = kda_decode(q, k, v, f, b, state, **kw)
    o2, S2 = kda(q, k, v, f, b, initial_state=state, output_final_state=True, impl="reference", **kw)
    np.testing.assert_allclose(o1, o2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(S1, S2, rtol=1e-5, atol=1e-6)
    assert S1.dtype == jnp.float32


def test_decode_requires_a_state():
    x = make_inputs(1, 1, 1, 1, 8, 8)
    with pytest.raises(ValueError, match="state must be a float32 array"):
        kda_decode(x["q"], x["k"], x["v"], x["g"], x["beta"], None)
