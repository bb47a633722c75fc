import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kda_jax.layers import GatedRMSNorm, RMSNorm
from tests.layers import numpy_ref as ref


def test_rms_norm_matches_numpy_and_computes_in_float32():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 48)) * 30
    norm = RMSNorm(48, eps=1e-5, rngs=nnx.Rngs(0))
    norm.weight[...] = jnp.asarray(1 + 0.1 * rng.standard_normal(48), jnp.float32)
    out = norm(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(out, ref.rms_norm(x, np.asarray(norm.weight[...]), 1e-5), rtol=2e-6, atol=2e-6)
    out_bf16 = norm(jnp.asarray(x, jnp.bfloat16))
    assert out_bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out_bf16, np.float64), np.asarray(out), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("activation", ["sigmoid", "swish", "none"])
def test_gated_rms_norm_per_head_with_one_shared_weight(activation):
    rng = np.random.default_rng(1)
    o, gate = rng.standard_normal((2, 3, 4, 16)), rng.standard_normal((2, 3, 4, 16))
    norm = GatedRMSNorm(16, activation=activation, rngs=nnx.Rngs(0))
    norm.weight[...] = jnp.asarray(rng.standard_normal(16), jnp.float32)
    got = norm(jnp.asarray(o, jnp.float32), jnp.asarray(gate, jnp.float32))
    act = {"sigmoid": ref.sigmoid(gate), "swish": ref.silu(gate), "none": 1.0}[activation]
    want = ref.rms_norm(o, np.asarray(norm.weight[...]), 1e-5) * act
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gated_rms_norm_rejects_unknown_activation():
    with pytest.raises(ValueError, match="output gate activation"):
        GatedRMSNorm(8, activation="relu", rngs=nnx.Rngs(0))
