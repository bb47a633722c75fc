"""KDAMixer(gate="gdn", rule="additive"): the scalar-decay, no-delta-rule ("Mamba2-like") mixer.

The float64 reference is ``numpy_ref.kda_layer`` (the whole layer, written from
kimi_linear_model §2.2) with its recurrence swapped for the additive one written here and the
write strength taken from the decay's step (``write="dt"``, Mamba2's discretisation).
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kda_jax.layers import KDAMixer
from tests.layers import numpy_ref as ref
from tests.layers.test_kda_mixer import D, H, K, _randomise, ref_rel


def additive_recurrence(q, k, v, g, beta, segment_ids=None):
    """o_t = S_tᵀ q_t with S_t = Diag(exp g_t) S_{t−1} + β_t k_t v_tᵀ; S restarts per document."""
    B, T, Hh, Kk = q.shape
    st = ref.starts(segment_ids, B, T)
    o = np.zeros((B, T, Hh, v.shape[-1]))
    for b in range(B):
        for h in range(Hh):
            for t in range(T):
                if st[b, t]:
                    S = np.zeros((Kk, v.shape[-1]))
                S = np.exp(g[b, t, h])[:, None] * S + beta[b, t, h] * np.outer(k[b, t, h], v[b, t, h])
                o[b, t, h] = S.T @ q[b, t, h]
    return o


@pytest.fixture
def additive_ref(monkeypatch):
    monkeypatch.setattr(ref, "kda_recurrence", additive_recurrence)
    return lambda m, x, **kw: ref.kda_layer(ref.params_of(m), x, H=H, K=K, gate="gdn", write="dt", **kw)


# one compiled program per call shape instead of op-by-op dispatch
_forward = nnx.jit(lambda m, x, segment_ids=None: m(jnp.asarray(x, jnp.float32), segment_ids))


def _mixer(seed=0, **kw):
    return _randomise(KDAMixer(D, H, K, gate="gdn", rule="additive", gate_rank=8, rngs=nnx.Rngs(seed), **kw),
                      seed + 100)


@pytest.mark.parametrize("kw", [dict(), dict(output_gate="none", conv_size=0)], ids=["default", "no-conv-no-gate"])
def test_additive_mixer_matches_numpy_layer(additive_ref, kw):
    m = _mixer(**kw)
    x = np.random.default_rng(1).standard_normal((2, 21, D))
    want = additive_ref(m, x, conv=kw.get("conv_size", 4) > 0, output_gate=kw.get("output_gate", "sigmoid"))
    assert ref_rel(_forward(m, x), want) < 1e-4
    # the delta rule on the same parameters is a different function
    delta = KDAMixer(D, H, K, gate="gdn", gate_rank=8, rngs=nnx.Rngs(0), **kw)
    nnx.update(delta, nnx.state(m, nnx.Param))
    assert ref_rel(_forward(delta, x), want) > 1e-2


def test_additive_mixer_is_causal():
    m = _mixer(seed=2)
    x = np.random.default_rng(2).standard_normal((1, 30, D))
    y = _forward(m, x)
    x2 = x.copy()
    x2[:, 17:] = np.random.default_rng(3).standard_normal((1, 13, D))
    y2 = _forward(m, x2)
    np.testing.assert_array_equal(np.asarray(y[:, :17]), np.asarray(y2[:, :17]))
    assert np.abs(np.asarray(y[:, 17:] - y2[:, 17:])).max() > 1e-3


def test_additive_mixer_packed_documents_are_isolated(additive_ref):
    m = _mixer(seed=3)
    x = np.random.default_rng(2).standard_normal((1, 40, D))
    seg = np.repeat([[0, 1, 2]], [13, 20, 7], axis=1)  # boundaries inside 16-token sub-chunks
    got = _forward(m, x, jnp.asarray(seg))
    assert ref_rel(got, additive_ref(m, x, segment_ids=seg)) < 1e-4
    assert ref_rel(got[:, 13:33], _forward(m, x[:, 13:33])) < 1e-5


def test_additive_mixer_gradients_reach_every_parameter_and_match_reference_impl():
    m = _mixer(seed=4)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 19, D)), jnp.float32)

    grad = nnx.jit(nnx.grad(lambda model: jnp.sum(jnp.sin(model(x)))))
    flat = {}
    for impl in ("chunked", "reference"):
        m.impl = impl
        flat[impl] = dict(nnx.to_flat_state(grad(m)))
    assert set(flat["chunked"]) == set(flat["reference"])
    for path, g in flat["chunked"].items():
        gc, gr = np.asarray(g.get_value()), np.asarray(flat["reference"][path].get_value())
        assert np.isfinite(gc).all(), path
        assert np.abs(gr).max() > 0, f"no gradient reaches {path}"
        assert ref_rel(gc, gr) < 1e-3, path


def test_additive_mixer_prefill_then_decode_equals_forward():
    m = _mixer(seed=5)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 24, D)), jnp.float32)
    seg = jnp.asarray(np.repeat([[0, 1]], [5, 15], axis=1).repeat(2, 0))  # a finished document, then the prompt
    full = _forward(m, x, jnp.concatenate([seg, jnp.ones((2, 4), seg.dtype)], axis=1))
    y, cache = nnx.jit(lambda m, x, s: m.prefill(x, s))(m, x[:, :20], seg)
    assert ref_rel(y, full[:, :20]) < 1e-5
    decode = nnx.jit(lambda m, xs, c: m.decode(xs, c))
    outs = []
    for a, b in ((20, 21), (21, 24)):
        o, cache = decode(m, x[:, a:b], cache)
        outs.append(o)
    assert ref_rel(jnp.concatenate(outs, axis=1), full[:, 20:]) < 1e-5


def test_additive_rule_errors_name_the_problem():
    with pytest.raises(ValueError, match="rule='additive' needs the scalar decay gate='gdn'"):
        KDAMixer(D, H, K, rule="additive", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rule must be one of"):
        KDAMixer(D, H, K, gate="gdn", rule="mamba", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="impl must be one of"):
        KDAMixer(D, H, K, gate="gdn", rule="additive", impl="mosaic", rngs=nnx.Rngs(0))
    assert KDAMixer(D, H, K, rngs=nnx.Rngs(0)).rule == "delta"
