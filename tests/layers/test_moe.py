"""MoE: sorted == dense (values and gradients), a NumPy token-loop reference, routing statistics,
bias balancing and the expert-parallel shard_map path on the 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kda_jax.layers.moe import MoE, balance_bias
from tests.layers.numpy_ref import params_of, sigmoid, silu
from tests.ops.helpers import rel_rmse

SMALL = dict(num_experts=8, top_k=2, expert_dim=16, num_shared_experts=1, routed_scaling_factor=2.446)
NO_SHARED = dict(num_experts=6, top_k=3, expert_dim=16, num_shared_experts=0, routed_scaling_factor=1.5)
D = 32


def _moe(cfg=SMALL, seed=0, bias_scale=0.0, **kw):
    m = MoE(D, **cfg, **kw, rngs=nnx.Rngs(seed))
    bias = np.random.default_rng(seed + 100).standard_normal(cfg["num_experts"]) * bias_scale
    m.e_score_correction_bias[...] = jnp.asarray(bias, jnp.float32)
    return m


def _x(B=2, T=7, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, T, D)), jnp.float32)


def numpy_moe(p, x, *, top_k, scale, renormalize=True, bias_in_weights=False):
    """Token loop over kimi_linear_model §2.4 in float64; returns (y, selected expert ids)."""
    x = np.asarray(x, np.float64)
    B, T, _ = x.shape
    y, chosen = np.zeros_like(x), np.zeros((B, T, top_k), int)
    for b in range(B):
        for t in range(T):
            s = sigmoid(x[b, t] @ p["gate"]["kernel"])
            biased = s + p["e_score_correction_bias"]
            sel = np.argsort(-biased, kind="stable")[:top_k]
            w = (biased if bias_in_weights else s)[sel]
            w = (w / (w.sum() + 1e-20) if renormalize else w) * scale
            for wk, e in zip(w, sel):
                h = silu(x[b, t] @ p["w1"][e]) * (x[b, t] @ p["w3"][e])
                y[b, t] += wk * (h @ p["w2"][e])
            if "shared_experts" in p:
                sp = p["shared_experts"]
                h = silu(x[b, t] @ sp["gate_proj"]["kernel"]) * (x[b, t] @ sp["up_proj"]["kernel"])
                y[b, t] += h @ sp["down_proj"]["kernel"]
            chosen[b, t] = sel
    return y, chosen


def numpy_aux_loss(p, x, mask, chosen, E, K, coef):
    """DeepSeek-V3 sequence-level balance loss, averaged over sequences with valid tokens."""
    x = np.asarray(x, np.float64)
    losses = []
    for b in range(x.shape[0]):
        valid = np.flatnonzero(mask[b])
        if not len(valid):
            continue
        s = sigmoid(x[b, valid] @ p["gate"]["kernel"])
        counts = np.bincount(chosen[b, valid].ravel(), minlength=E)
        f = E / (K * len(valid)) * counts
        prob = (s / s.sum(-1, keepdims=True)).mean(0)
        losses.append(np.sum(f * prob))
    return coef * np.mean(losses)


def _loss_and_grads(model, x, mesh=None):
    """Σ y ⊙ R for a fixed random R; gradients w.r.t. x and every nnx.Param."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    proj = jnp.asarray(np.random.default_rng(7).standard_normal(x.shape), jnp.float32)

    @jax.jit
    def loss(params, x):
        y, _ = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(y * proj), y

    grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
    if mesh is None:
        return grad(params, x)
    with jax.set_mesh(mesh):
        return grad(params, x)


@pytest.mark.parametrize("cfg", [SMALL, NO_SHARED], ids=["E8k2_shared", "E6k3_noshared"])
def test_sorted_matches_dense_values_and_grads(cfg):
    x = _x()
    (gp_s, gx_s), y_s = _loss_and_grads(_moe(cfg, bias_scale=0.1), x)
    (gp_d, gx_d), y_d = _loss_and_grads(_moe(cfg, bias_scale=0.1, dispatch="dense"), x)
    assert rel_rmse(y_s, y_d) < 1e-6
    assert rel_rmse(gx_s, gx_d) < 1e-6
    flat_s, flat_d = nnx.to_flat_state(gp_s), nnx.to_flat_state(gp_d)
    assert [k for k, _ in flat_s] == [k for k, _ in flat_d] and len(flat_s) == (7 if cfg is SMALL else 4)
    for (path, a), (_, b) in zip(flat_s, flat_d):
        assert np.abs(np.asarray(b[...])).max() > 0, path
        assert rel_rmse(a[...], b[...]) < 1e-6, path


@pytest.mark.parametrize("cfg", [SMALL, NO_SHARED], ids=["E8k2_shared", "E6k3_noshared"])
def test_few_tokens_gathered_path_matches_dense_values_and_grads(cfg):
    """N * K <= E (decode-sized calls) takes the per-assignment gather path of the sorted dispatch."""
    x = _x(B=1, T=2, seed=3)
    assert x.shape[0] * x.shape[1] * cfg["top_k"] <= cfg["num_experts"]
    (gp_s, gx_s), y_s = _loss_and_grads(_moe(cfg, bias_scale=0.1), x)
    (gp_d, gx_d), y_d = _loss_and_grads(_moe(cfg, bias_scale=0.1, dispatch="dense"), x)
    assert rel_rmse(y_s, y_d) < 1e-6
    assert rel_rmse(gx_s, gx_d) < 1e-6
    for (path, a), (_, b) in zip(nnx.to_flat_state(gp_s), nnx.to_flat_state(gp_d)):
        assert rel_rmse(a[...], b[...]) < 1e-6, path


def test_gathered_path_drops_experts_outside_the_local_range():
    from kda_jax.layers.moe import gathered_experts, sorted_experts

    rng = np.random.default_rng(5)
    E, D_, F, N, K = 8, 12, 6, 5, 2  # N * K > E: sorted_experts takes the block path
    w1, w3 = (jnp.asarray(rng.standard_normal((E, D_, F)), jnp.float32) for _ in range(2))
    w2 = jnp.asarray(rng.standard_normal((E, F, D_)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((N, D_)), jnp.float32)
    idx = jnp.asarray(rng.integers(0, E, (N, K)), jnp.int32)
    w = jnp.asarray(rng.random((N, K)), jnp.float32)
    for first in (0, 3):  # local experts first .. first + 4: the others give zero
        local = (w1[first:first + 4], w3[first:first + 4], w2[first:first + 4])
        a = gathered_experts(x, idx, w, *local, jnp.float32, first_expert=first)
        b = sorted_experts(x, idx, w, *local, jnp.float32, first_expert=first)
        assert np.abs(np.asarray(b)).max() > 0
        assert rel_rmse(a, b) < 1e-6


def test_gathered_path_outputs_and_gradients_match_dense():
    """Decode-sized calls (N * K <= E) take the gathered path, whose products are 8-row GEMMs of a
    repeated row: outputs and the gradients of input, weights and routing weights equal the dense path."""
    from kda_jax.layers.moe import dense_experts, gathered_experts

    rng = np.random.default_rng(7)
    E, D_, F, N, K = 16, 12, 6, 3, 2
    args = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((N, D_), (N, K), (E, D_, F), (E, D_, F), (E, F, D_))]
    idx = jnp.asarray(np.stack([rng.choice(E, K, replace=False) for _ in range(N)]), jnp.int32)
    cot = jnp.asarray(rng.standard_normal((N, D_)), jnp.float32)

    def loss(fn, x, w, w1, w3, w2):
        return jnp.sum(fn(x, idx, w, w1, w3, w2, jnp.float32) * cot)

    ga = jax.value_and_grad(lambda *a: loss(gathered_experts, *a), argnums=range(5))(*args)
    gd = jax.value_and_grad(lambda *a: loss(dense_experts, *a), argnums=range(5))(*args)
    assert abs(float(ga[0]) - float(gd[0])) < 1e-4 * abs(float(gd[0])) + 1e-5
    for a, b in zip(ga[1], gd[1]):
        assert np.abs(np.asarray(b)).max() > 0
        assert rel_rmse(a, b) < 1e-6


@pytest.mark.parametrize("dispatch", ["sorted", "dense"])
@pytest.mark.parametrize("cfg", [SMALL, NO_SHARED], ids=["E8k2_shared", "E6k3_noshared"])
def test_matches_numpy_reference(cfg, dispatch):
    m, x = _moe(cfg, bias_scale=0.1, dispatch=dispatch), _x()
    y, stats = m(x)
    y_ref, _ = numpy_moe(params_of(m), x, top_k=cfg["top_k"], scale=cfg["routed_scaling_factor"])
    assert y.dtype == jnp.float32 and y.shape == x.shape
    assert rel_rmse(y, y_ref) < 1e-5


@pytest.mark.parametrize("dispatch", ["sorted", "dense"])
def test_bias_in_weights_reproduces_hf_remote_code(dispatch):
    x = _x()
    m_ref = _moe(bias_scale=0.3, dispatch=dispatch)
    m_hf = _moe(bias_scale=0.3, dispatch=dispatch, router_bias_in_weights=True)
    y, y_hf = m_ref(x)[0], m_hf(x)[0]
    y_np, _ = numpy_moe(params_of(m_hf), x, top_k=2, scale=SMALL["routed_scaling_factor"], bias_in_weights=True)
    assert rel_rmse(y_hf, y_np) < 1e-5
    assert rel_rmse(y_hf, y) > 1e-2  # the biased weights change the output, not just rounding


def test_renormalize_off_matches_reference():
    m, x = _moe(renormalize=False, bias_scale=0.1), _x()
    y_ref, _ = numpy_moe(params_of(m), x, top_k=2, scale=SMALL["routed_scaling_factor"], renormalize=False)
    assert rel_rmse(m(x)[0], y_ref) < 1e-5


def test_a_large_bias_forces_selection():
    m, x = _moe(), _x()
    m.e_score_correction_bias[...] = jnp.zeros(8, jnp.float32).at[5].set(10.0)
    load = np.asarray(m(x)[1].load)
    # every token picks expert 5, so it receives 1/top_k of all assignments
    np.testing.assert_allclose(load[5], 1 / SMALL["top_k"], rtol=1e-6)
    _, chosen = numpy_moe(params_of(m), x, top_k=2, scale=1.0)
    assert (chosen == 5).any(-1).all()


def test_load_counts_valid_tokens_only():
    m, x = _moe(bias_scale=0.1, seq_aux_loss_coef=0.01), _x(B=3, T=6)
    mask = np.ones((3, 6), bool)
    mask[0, 4:], mask[2, :] = False, False
    _, stats = m(x, jnp.asarray(mask))
    _, chosen = numpy_moe(params_of(m), x, top_k=2, scale=1.0)
    counts = np.bincount(chosen[mask].ravel(), minlength=8)
    np.testing.assert_allclose(stats.load, counts / counts.sum(), rtol=1e-6)
    np.testing.assert_allclose(stats.max_violation, counts.max() / counts.mean() - 1.0, rtol=1e-6)
    x_changed = x.at[0, 5].set(100.0).at[2].set(-50.0)  # padding tokens changed arbitrarily
    _, stats2 = m(x_changed, jnp.asarray(mask))
    np.testing.assert_array_equal(stats.load, stats2.load)
    np.testing.assert_array_equal(stats.aux_loss, stats2.aux_loss)


def test_aux_loss_matches_numpy_and_reaches_the_router():
    x = _x(B=2, T=9)
    mask = np.ones((2, 9), bool)
    mask[1, 6:] = False
    assert float(_moe()(x, jnp.asarray(mask))[1].aux_loss) == 0.0
    m = _moe(bias_scale=0.1, seq_aux_loss_coef=0.01)
    aux = m(x, jnp.asarray(mask))[1].aux_loss
    p = params_of(m)
    _, chosen = numpy_moe(p, x, top_k=2, scale=1.0)
    ref = numpy_aux_loss(p, x, mask, chosen, E=8, K=2, coef=0.01)
    assert ref > 0 and aux.dtype == jnp.float32
    np.testing.assert_allclose(aux, ref, rtol=1e-5)
    grads = nnx.grad(lambda m: m(x, jnp.asarray(mask))[1].aux_loss)(m)
    assert np.abs(np.asarray(grads["gate"]["kernel"][...])).max() > 0
    assert "e_score_correction_bias" not in grads  # RouterBias is not an nnx.Param


def test_balance_bias_sign_update():
    bias = jnp.asarray([0.2, -0.1, 0.0, 0.3], jnp.float32)
    load = jnp.asarray([0.5, 0.25, 0.25, 0.0], jnp.float32)
    # mean load 0.25: expert 0 over-loaded (bias down), 1 and 2 balanced, 3 under-loaded (bias up)
    expected = np.asarray(bias) + 0.1 * np.array([-1.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(balance_bias(bias, load, 0.1), expected, rtol=1e-6)
    m = _moe(NO_SHARED)
    m.update_bias(jnp.asarray([0.3, 0.1, 0.1, 0.3, 0.2, 0.0], jnp.float32), 0.01)  # mean 1/6
    np.testing.assert_allclose(m.e_score_correction_bias[...], [-0.01, 0.01, 0.01, -0.01, -0.01, 0.01], rtol=1e-6)


@pytest.mark.parametrize("shape", [(2, 1, 1, 4), (1, 2, 2, 2)])
def test_expert_parallel_matches_unsharded(shape):
    mesh = jax.make_mesh(shape, ("data", "fsdp", "tensor", "expert"), axis_types=(jax.sharding.AxisType.Auto,) * 4)
    m, x = _moe(bias_scale=0.1), _x(B=4, T=5)
    (gp, gx), y = _loss_and_grads(m, x)
    (gp_ep, gx_ep), y_ep = _loss_and_grads(m, x, mesh)
    assert rel_rmse(y_ep, y) < 1e-6
    assert rel_rmse(gx_ep, gx) < 1e-6
    for (path, a), (_, b) in zip(nnx.to_flat_state(gp_ep), nnx.to_flat_state(gp)):
        assert rel_rmse(a[...], b[...]) < 1e-6, path


def test_expert_parallel_rejects_indivisible_experts():
    mesh = jax.make_mesh((2, 1, 1, 4), ("data", "fsdp", "tensor", "expert"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="not divisible"):
        _moe(NO_SHARED)(_x())


def test_jit_and_bf16_compute():
    x = _x(B=2, T=16)
    m32, m16 = _moe(bias_scale=0.1), _moe(bias_scale=0.1, dtype=jnp.bfloat16)
    y32 = m32(x)[0]
    y_jit, stats = nnx.jit(lambda m, x: m(x))(m32, x)
    assert rel_rmse(y_jit, y32) < 1e-6 and stats.load.shape == (8,)
    y16 = nnx.jit(lambda m, x: m(x)[0])(m16, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    assert rel_rmse(y16, y32) < 2e-2


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        MoE(D, **{**SMALL, "top_k": 9}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dispatch"):
        MoE(D, **SMALL, dispatch="capacity", rngs=nnx.Rngs(0))
    m = _moe()
    with pytest.raises(ValueError, match="shape"):
        m(jnp.zeros((4, D), jnp.float32))
    with pytest.raises(ValueError, match="shape"):
        m(jnp.zeros((1, 4, D + 1), jnp.float32))
    with pytest.raises(ValueError, match="token_mask"):
        m(jnp.zeros((1, 4, D), jnp.float32), jnp.ones((4,), bool))
