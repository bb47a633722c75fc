import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kda_jax.layers import MLAttention
from kda_jax.layers.mla import apply_rope, causal_attention
from tests.layers import numpy_ref as ref
from tests.layers.test_kda_mixer import _randomise, ref_rel

D, H = 24, 3
DIMS = dict(kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)


def _mla(seed=0, **kw):
    return _randomise(MLAttention(D, H, rngs=nnx.Rngs(seed), **DIMS, **kw), seed + 7)


@pytest.mark.parametrize("q_lora_rank", [None, 10])
def test_mla_matches_numpy_per_head_attention(q_lora_rank):
    m = _mla(q_lora_rank=q_lora_rank)
    x = np.random.default_rng(0).standard_normal((2, 13, D))
    got = m(jnp.asarray(x, jnp.float32))
    want = ref.mla_layer(ref.params_of(m), x, H=H, nope=8, rope=4, v_dim=6, kv_lora=12)
    assert ref_rel(got, want) < 1e-5


def test_mla_packed_documents_are_isolated():
    m = _mla(seed=1)
    x = np.random.default_rng(1).standard_normal((1, 17, D))
    seg = np.repeat([[4, 9, 2]], [5, 8, 4], axis=1)
    got = m(jnp.asarray(x, jnp.float32), jnp.asarray(seg))
    want = ref.mla_layer(ref.params_of(m), x, H=H, nope=8, rope=4, v_dim=6, kv_lora=12, segment_ids=seg)
    assert ref_rel(got, want) < 1e-5
    alone = m(jnp.asarray(x[:, 5:13], jnp.float32))
    assert ref_rel(got[:, 5:13], alone) < 1e-5


def test_rope_ablation_rotates_and_is_relative():
    m = _mla(seed=2, use_rope=True)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 9, D)), jnp.float32)
    nope = _mla(seed=2)
    assert ref_rel(m(x), nope(x)) > 1e-3  # the rotation changes the function
    shifted = m(x, positions=jnp.arange(9)[None] + 100)  # only relative positions matter
    assert ref_rel(shifted, m(x)) < 1e-4
    v = jnp.asarray(np.random.default_rng(3).standard_normal((1, 5, 1, 8)), jnp.float32)
    np.testing.assert_allclose(jnp.linalg.norm(apply_rope(v, jnp.arange(5)[None] * 7, 1e4), axis=-1),
                               jnp.linalg.norm(v, axis=-1), rtol=1e-5)


def test_causal_attention_xla_handles_v_dim_smaller_than_qk():
    rng = np.random.default_rng(4)
    q, k = (jnp.asarray(rng.standard_normal((2, 6, 2, 8)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((2, 6, 2, 5)), jnp.float32)
    o = causal_attention(q, k, v, scale=0.3, impl="xla")
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * 0.3
    logits = np.where(np.tril(np.ones((6, 6), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(o, np.einsum("bhqk,bkhd->bqhd", p, v), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="impl"):
        causal_attention(q, k, v, scale=0.3, impl="flash")


@pytest.mark.gpu
def test_cudnn_attention_equals_xla_on_gpu():
    rng = np.random.default_rng(5)
    q, k = (jnp.asarray(rng.standard_normal((2, 256, 4, 192)), jnp.bfloat16) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((2, 256, 4, 128)), jnp.bfloat16)
    seg = jnp.asarray(np.repeat([[0, 1, 2]], [100, 100, 56], axis=1).repeat(2, 0))
    for s in (None, seg):
        a = causal_attention(q, k, v, scale=192**-0.5, segment_ids=s, impl="cudnn")
        b = causal_attention(q, k, v, scale=192**-0.5, segment_ids=s, impl="xla")
        assert ref_rel(a, b) < 1e-2
