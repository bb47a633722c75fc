"""``Linear`` and the router on a single row (decoding one sequence): widened to a
``GEMM_ROWS``-row product (``common.widened``), same values and gradients as the plain product."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kda_jax.layers.common import GEMM_ROWS, Linear
from kda_jax.layers.moe import route


def _dot_lhs_shapes(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args)
    return [e.invars[0].aval.shape for e in jaxpr.eqns if e.primitive.name == "dot_general"]


def test_single_row_linear_is_a_gemm_with_the_plain_products_values_and_gradients():
    lin = Linear(24, 10, (None, None), rngs=nnx.Rngs(0))
    w = np.asarray(lin.kernel[...], np.float64)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 1, 24)), jnp.float32)
    dy = np.random.default_rng(1).standard_normal((1, 1, 10))
    assert _dot_lhs_shapes(lin, x) == [(GEMM_ROWS, 24)]
    np.testing.assert_allclose(lin(x), np.asarray(x, np.float64) @ w, rtol=1e-5, atol=1e-6)

    graphdef, state = nnx.split(lin)
    g_state, g_x = jax.grad(lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x) * dy), argnums=(0, 1))(state, x)
    g_w = g_state["kernel"][...]
    np.testing.assert_allclose(g_x, dy @ w.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_w, np.asarray(x, np.float64)[0].T @ dy[0], rtol=1e-5, atol=1e-6)
    assert _dot_lhs_shapes(lin, jnp.ones((2, 3, 24))) == [(2, 3, 24)]  # more rows: the plain product


def test_single_row_routing_equals_the_same_row_in_a_batch():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((5, 16)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(8) * 0.1, jnp.float32)
    batch = route(x, kernel, bias, 2, renormalize=True, scale=2.5, bias_in_weights=False)
    for i in range(5):
        one = route(x[i:i + 1], kernel, bias, 2, renormalize=True, scale=2.5, bias_in_weights=False)
        np.testing.assert_array_equal(one[1], batch[1][i:i + 1])
        for a, b in ((one[0], batch[0]), (one[2], batch[2])):
            np.testing.assert_allclose(a, b[i:i + 1], rtol=1e-6, atol=1e-7)
    assert _dot_lhs_shapes(lambda x: route(x, kernel, bias, 2, renormalize=True, scale=1.0,
                                           bias_in_weights=False), x[:1]) == [(GEMM_ROWS, 16)]
