import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kda_jax.models import HybridDecoder, document_positions, get_config, variant
from tests.layers.test_kda_mixer import ref_rel
from tests.models.helpers import two_layer_config


def _model(name="tiny", seed=0, **overrides):
    return HybridDecoder(get_config(name, **overrides), rngs=nnx.Rngs(seed))


@jax.jit
def _logits(model, tokens, segment_ids=None):
    return model(tokens, segment_ids=segment_ids).logits


def _tokens(B, T, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (B, T)), jnp.int32)


def test_tiny_model_structure_follows_the_config():
    m = _model()
    kinds = [(type(b.self_attn).__name__, hasattr(b, "block_sparse_moe")) for b in m.layers]
    assert kinds == [("KDAMixer", False), ("KDAMixer", True), ("KDAMixer", True), ("MLAttention", True)]
    out = jax.jit(lambda mm, t: mm(t))(m, _tokens(2, 21))
    assert out.logits.shape == (2, 21, 256) and out.logits.dtype == jnp.float32
    assert len(out.router_stats) == 3 and np.isfinite(np.asarray(out.logits)).all()


@pytest.mark.parametrize("name", ["hybrid", "mla_only", "gdn_hybrid"])
def test_packed_documents_do_not_see_each_other(name):
    cfg = two_layer_config()
    m = HybridDecoder(cfg if name == "hybrid" else variant(cfg, name), rngs=nnx.Rngs(1))
    tok = _tokens(1, 45, seed=1)
    seg = jnp.asarray(np.repeat([[0, 1, 2]], [17, 20, 8], axis=1))
    packed = _logits(m, tok, seg)
    for lo, hi in ((0, 17), (17, 37), (37, 45)):
        # each document alone, right-padded to 45 tokens (one compile; the padding comes after it)
        alone = _logits(m, jnp.pad(tok[:, lo:hi], ((0, 0), (0, 45 - (hi - lo)))))[:, :hi - lo]
        assert ref_rel(packed[:, lo:hi], alone) < 1e-5, (lo, hi)


def test_causality_of_the_whole_model():
    m = _model(seed=2)
    a, b = _tokens(1, 30, seed=2), _tokens(1, 30, seed=3)
    mixed = a.at[:, 20:].set(b[:, 20:])
    la, lm = _logits(m, a), _logits(m, mixed)
    np.testing.assert_allclose(la[:, :20], lm[:, :20], rtol=1e-5, atol=1e-5)
    assert not np.allclose(la[:, 20:], lm[:, 20:])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gradients_are_finite_and_reach_all_parameters(dtype):
    m = HybridDecoder(two_layer_config(dtype=dtype), rngs=nnx.Rngs(3))  # every kind of parameter, two layers
    tok = _tokens(2, 24, seed=4)

    def loss(model):
        logits = model(tok).logits
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tok[..., None], -1))

    grads = jax.jit(nnx.grad(loss))(m)
    for path, g in nnx.to_flat_state(grads):
        g = np.asarray(g.get_value(), np.float32)
        assert np.isfinite(g).all(), path
        assert np.abs(g).max() > 0, f"no gradient reaches {path}"


def test_remat_policies_do_not_change_values_or_gradients():
    tok = _tokens(1, 20, seed=5)
    grads = {}
    for remat in ("none", "full", "dots"):
        m = HybridDecoder(two_layer_config(remat=remat), rngs=nnx.Rngs(4))
        grads[remat] = jax.tree.leaves(jax.jit(nnx.grad(lambda mm: jnp.sum(mm(tok).logits ** 2) * 1e-3))(m))
    for remat in ("full", "dots"):
        for a, b in zip(grads[remat], grads["none"]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_twins_share_everything_but_the_mixers():
    flat = lambda m: {p: v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(m))}
    base, mla, gdn = (flat(nnx.eval_shape(lambda n=n: _model(n))) for n in ("tiny", "tiny_mla_only", "tiny_gdn_hybrid"))
    non_mixer = lambda f: {p: s for p, s in f.items() if "self_attn" not in p}
    assert non_mixer(base) == non_mixer(mla) == non_mixer(gdn)
    assert {p for p in base if "self_attn" in p and "f_a_proj" in p}
    assert not {p for p in gdn if "f_a_proj" in p} and not {p for p in mla if "q_conv1d" in p}


def test_document_positions_and_input_errors():
    seg = jnp.asarray([[3, 3, 3, 5, 5, 1]])
    np.testing.assert_array_equal(document_positions(seg), [[0, 1, 2, 0, 1, 0]])
    m = _model()
    with pytest.raises(ValueError, match="integer array"):
        m(jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="segment_ids must have shape"):
        m(_tokens(2, 5), segment_ids=jnp.zeros((2, 4), jnp.int32))


def test_router_bias_update_follows_each_layers_load():
    m = _model(seed=5)
    out = jax.jit(lambda mm, t: mm(t))(m, _tokens(2, 16, seed=6))
    before = [np.asarray(b.block_sparse_moe.e_score_correction_bias[...]) for b in m.layers if b.is_moe]
    m.update_router_biases([s.load for s in out.router_stats], 0.01)
    for b0, blk, s in zip(before, [b for b in m.layers if b.is_moe], out.router_stats):
        load = np.asarray(s.load)
        np.testing.assert_allclose(np.asarray(blk.block_sparse_moe.e_score_correction_bias[...]) - b0,
                                   0.01 * np.sign(load.mean() - load), atol=1e-7)
    with pytest.raises(ValueError, match="the model has 3"):
        m.update_router_biases([out.router_stats[0].load], 0.01)


@pytest.mark.gpu
def test_gpu_paths_match_the_xla_and_dense_references():
    """On GPU: cuDNN attention and ragged_dot MoE dispatch against the XLA / dense paths, bf16."""
    tok = _tokens(2, 200, seed=7)
    seg = jnp.asarray(np.repeat([[0, 1, 2]], [90, 70, 40], axis=1).repeat(2, 0))
    ref = _model(dtype="bfloat16", attn_impl="xla", moe_dispatch="dense", seed=8)
    fast = _model(dtype="bfloat16", attn_impl="cudnn", moe_dispatch="sorted", seed=8)
    for s in (None, seg):
        assert ref_rel(_logits(fast, tok, s), _logits(ref, tok, s)) < 2e-2
