import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kda_jax.layers import ShortConv
from tests.layers import numpy_ref as ref


def _conv(C=6, W=4, seed=0):
    return ShortConv(C, W, rngs=nnx.Rngs(seed))


def test_short_conv_matches_numpy_taps_orientation():
    x = np.random.default_rng(0).standard_normal((2, 9, 6))
    conv = _conv()
    y, cache = conv(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(y, ref.short_conv(x, np.asarray(conv.weight[...])), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cache, np.asarray(x[:, -3:], np.float32))


def test_short_conv_documents_do_not_leak():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 10, 6))
    seg = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2, 2]])
    conv = _conv()
    y, _ = conv(jnp.asarray(x, jnp.float32), jnp.asarray(seg))
    np.testing.assert_allclose(y, ref.short_conv(x, np.asarray(conv.weight[...]), seg), rtol=1e-5, atol=1e-6)
    for lo, hi in ((0, 3), (3, 5), (5, 10)):  # each document alone
        alone, _ = conv(jnp.asarray(x[:, lo:hi], jnp.float32))
        np.testing.assert_allclose(y[:, lo:hi], alone, rtol=1e-5, atol=1e-6)


def test_short_conv_cache_continues_the_sequence():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 11, 6)), jnp.float32)
    conv = _conv()
    full, _ = conv(x)
    y, cache = conv(x[:, :7])
    outs = [y]
    for t in range(7, 11):
        y_t, cache = conv(x[:, t:t + 1], cache=cache)
        outs.append(y_t)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-6, atol=1e-6)


def test_short_conv_rejects_wrong_channels_and_cache():
    conv = _conv()
    with pytest.raises(ValueError, match="channels"):
        conv(jnp.zeros((1, 4, 5)))
    with pytest.raises(ValueError, match="conv cache"):
        conv(jnp.zeros((1, 4, 6)), cache=jnp.zeros((1, 2, 6)))
