import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kda_jax.layers import KDAMixer
from tests.layers import numpy_ref as ref

H, K, D = 2, 16, 24


def _randomise(module, seed):
    """Every parameter O(1)-random so each one matters (init leaves gates and norms near trivial)."""
    rng = np.random.default_rng(seed)
    state = nnx.state(module, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        shape = var.get_value().shape
        scale = 1.0 / np.sqrt(shape[0]) if len(shape) == 2 else 0.5
        var.set_value(jnp.asarray(rng.standard_normal(shape) * scale + (1.0 if path[-1] == "weight" and len(shape) == 1 else 0.0),
                                  jnp.float32))
    return module


def _mixer(seed=0, **kw):
    return _randomise(KDAMixer(D, H, K, gate_rank=8, rngs=nnx.Rngs(seed), **kw), seed + 100)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(output_gate="swish"),
    dict(output_gate="none", conv_size=0),
    dict(gate="gdn"),
])
def test_kda_mixer_matches_numpy_layer(kw):
    m = _mixer(**kw)
    x = np.random.default_rng(1).standard_normal((2, 21, D))
    got = m(jnp.asarray(x, jnp.float32))
    want = ref.kda_layer(ref.params_of(m), x, H=H, K=K, conv=kw.get("conv_size", 4) > 0, gate=kw.get("gate", "kda"),
                         output_gate=kw.get("output_gate", "sigmoid"))
    assert ref_rel(got, want) < 1e-4


def ref_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b**2)))


def test_kda_mixer_packed_documents_are_isolated():
    m = _mixer(seed=3)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 40, D))
    seg = np.repeat([[0, 1, 2]], [13, 20, 7], axis=1)  # boundaries inside 16-token sub-chunks
    got = m(jnp.asarray(x, jnp.float32), jnp.asarray(seg))
    want = ref.kda_layer(ref.params_of(m), x, H=H, K=K, segment_ids=seg)
    assert ref_rel(got, want) < 1e-4
    alone = m(jnp.asarray(x[:, 13:33], jnp.float32))
    assert ref_rel(got[:, 13:33], alone) < 1e-5


def test_kda_mixer_gradients_reach_every_parameter_and_match_reference_impl():
    m = _mixer(seed=4)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 19, D)), jnp.float32)

    def loss(model, impl):
        model.impl = impl
        return jnp.sum(jnp.sin(model(x)))

    grads = {impl: nnx.grad(lambda mm: loss(mm, impl))(m) for impl in ("chunked", "reference")}
    flat_c = dict(nnx.to_flat_state(grads["chunked"]))
    flat_r = dict(nnx.to_flat_state(grads["reference"]))
    assert set(flat_c) == set(flat_r)
    for path in flat_c:
        gc, gr = np.asarray(flat_c[path].get_value()), np.asarray(flat_r[path].get_value())
        assert np.isfinite(gc).all(), path
        assert np.abs(gr).max() > 0, f"no gradient reaches {path}"
        assert ref_rel(gc, gr) < 1e-3, path


def test_kda_mixer_parameters_and_flags():
    m = KDAMixer(D, H, K, rngs=nnx.Rngs(0))
    assert m.A_log.get_metadata()["no_decay"] and m.dt_bias.get_metadata()["no_decay"]
    assert m.dt_bias[...].shape == (H * K,) and m.A_log[...].shape == (H,)
    assert m.dt_bias[...].dtype == jnp.float32
    assert np.all((np.exp(m.A_log[...]) >= 1) & (np.exp(m.A_log[...]) <= 16))
    gdn = KDAMixer(D, H, K, gate="gdn", rngs=nnx.Rngs(0))
    assert gdn.dt_bias[...].shape == (H,) and not hasattr(gdn, "f_a_proj")
    assert not hasattr(KDAMixer(D, H, K, output_gate="none", rngs=nnx.Rngs(0)), "g_a_proj")
    assert not hasattr(KDAMixer(D, H, K, conv_size=0, rngs=nnx.Rngs(0)), "q_conv1d")
    with pytest.raises(ValueError, match="gate"):
        KDAMixer(D, H, K, gate="mamba", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[B, T, 24\]"):
        m(jnp.zeros((2, 3, 5)))
