"""The train step: sharded == single device, accumulation == one batch, NaN guard, masks, optimisers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kda_jax.train.config import MeshConfig, OptimConfig, TrainConfig
from kda_jax.train.mesh import global_batch, make_mesh, mesh_shape
from kda_jax.train.optim import decay_mask, schedule
from kda_jax.train.trainer import Trainer
from tests.layers.test_kda_mixer import ref_rel
from tests.models.helpers import two_layer_config


def _batch(B=8, T=24, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, (B, T)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    seg[:, 10:] = 2
    seg[0, 20:] = 0  # padding
    pos = np.where(seg == 2, np.arange(T) - 10, np.arange(T)).astype(np.int32) * (seg > 0)
    targets = np.roll(tokens, -1, axis=1)
    mask = ((np.roll(seg, -1, axis=1) == seg) & (seg > 0)).astype(np.float32)
    mask[:, -1] = 0
    return {"tokens": tokens, "targets": targets * (mask > 0), "loss_mask": mask, "segment_ids": seg,
            "positions": pos}


# tiny with two layers: KDA + MLA, a dense FFN and an MoE (compiles fast)
SMALL = two_layer_config()
# Adam's eps = 1e-3 for the reason given in test_sharded_step_equals_single_device_step; one optimiser for
# every test here, so they share one compiled single-device trainer (its tests share an xdist group)
OPTIM = OptimConfig(learning_rate=1e-2, warmup_steps=2, eps=1e-3)
SHARED = pytest.mark.xdist_group("train_step")
_CACHE = {}


def _trainer(mesh_cfg, devices=None, *, optim=OPTIM, **train):
    key = (mesh_cfg, len(devices or jax.devices()), optim, tuple(sorted(train.items())))
    if key not in _CACHE:
        mesh = make_mesh(mesh_cfg, devices)
        train = TrainConfig(**{"steps": 50, "seed": 0, **train})
        _CACHE[key] = Trainer.build(SMALL, optim, train, mesh)
    return _CACHE[key]


def _run(trainer, batches, init=None):
    """``init``: another trainer's ``init`` of the same state layout (one compile fewer)."""
    with jax.set_mesh(trainer.mesh):
        state = (init or trainer.init)()
        losses = []
        for b in batches:
            state, m = trainer.step(state, global_batch(b, trainer.mesh))
            losses.append(float(m["loss"]))
    return jax.device_get(state), losses


@SHARED
def test_sharded_step_equals_single_device_step():
    # OPTIM's eps = 1e-3 for the reason given in test_gradient_accumulation_equals_one_batch: with Adam's
    # tiny default eps a near-zero gradient entry (rows of the embedding no token used) becomes an update
    # of ±lr whose sign float32 reordering decides, so the comparison would measure rounding luck
    # (1.1e-5 with eps 1e-8 after the MoE block size changed from 8 to 128 rows, 1.0e-7 with eps 1e-3);
    # the losses compare the forward and the first update with no such amplification.
    batches = [_batch(seed=s) for s in range(2)]
    one, l1 = _run(_trainer(MeshConfig(fsdp=1), jax.devices()[:1]), batches)
    many, l8 = _run(_trainer(MeshConfig(data=2, fsdp=2, tensor=2, expert=1)), batches)
    ep, le = _run(_trainer(MeshConfig(data=1, fsdp=2, tensor=1, expert=4)), batches)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    np.testing.assert_allclose(le, l1, rtol=1e-5)
    worst = 0.0
    for a, b, c in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(many["params"]), jax.tree.leaves(ep["params"])):
        worst = max(worst, ref_rel(b, a), ref_rel(c, a))
    assert worst < 1e-5, worst


@SHARED
def test_gradient_accumulation_equals_one_batch():
    # Adam with a tiny eps turns a gradient entry near 0 into an update of ±lr, so float32 rounding
    # of the (differently ordered) sums could flip whole updates; OPTIM's eps = 1e-3 keeps the update a
    # smooth function of the gradient, and the comparison measures the accumulation itself.
    batches = [_batch(seed=s) for s in range(2)]
    one_batch = _trainer(MeshConfig(fsdp=1), jax.devices()[:1])
    full, lf = _run(one_batch, batches)
    acc, la = _run(_trainer(MeshConfig(fsdp=1), jax.devices()[:1], microbatches=4), batches, init=one_batch.init)
    np.testing.assert_allclose(la, lf, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(full["params"]), jax.tree.leaves(acc["params"])):
        assert ref_rel(b, a) < 1e-5


@SHARED
def test_masked_targets_do_not_count():
    trainer = _trainer(MeshConfig(fsdp=1), jax.devices()[:1])
    b = _batch()
    other = dict(b, targets=np.where(b["loss_mask"] > 0, b["targets"], 7).astype(np.int32))
    with jax.set_mesh(trainer.mesh):
        state = trainer.init()
        e1 = trainer.eval_step(state, global_batch(b, trainer.mesh))
        e2 = trainer.eval_step(state, global_batch(other, trainer.mesh))
    assert float(e1["nll_sum"]) == float(e2["nll_sum"]) and float(e1["tokens"]) == b["loss_mask"].sum()


@SHARED
def test_non_finite_step_is_skipped_and_counted():
    trainer = _trainer(MeshConfig(fsdp=1), jax.devices()[:1])
    with jax.set_mesh(trainer.mesh):
        state = trainer.init()
        state["params"]["layers"][0]["mlp"]["up_proj"]["kernel"] = (
            state["params"]["layers"][0]["mlp"]["up_proj"]["kernel"].at[0, 0].set(jnp.nan))
        before = jax.device_get(state)
        state, m = trainer.step(state, global_batch(_batch(), trainer.mesh))
    after = jax.device_get(state)
    assert float(m["finite"]) == 0 and int(after["bad_steps"]) == 1 and int(after["step"]) == 1
    for a, b in zip(jax.tree.leaves(before["opt"]), jax.tree.leaves(after["opt"])):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(before["params"]["lm_head"], after["params"]["lm_head"])


@pytest.mark.parametrize("name", [pytest.param("adamw", marks=SHARED), "muon"])
def test_loss_falls_and_router_biases_move(name):
    optim = OPTIM if name == "adamw" else OptimConfig(name=name, learning_rate=1e-2, warmup_steps=2)
    trainer = _trainer(MeshConfig(fsdp=1), jax.devices()[:1], optim=optim)
    b = _batch()
    with jax.set_mesh(trainer.mesh):
        state = trainer.init()
        router0 = jax.device_get(state["router"])
        losses = []
        for _ in range(15):
            state, m = trainer.step(state, global_batch(b, trainer.mesh))
            losses.append(float(m["loss"]))
    assert losses[-1] < 0.7 * losses[0], losses
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(router0), jax.tree.leaves(jax.device_get(state["router"])))]
    assert max(moved) > 0


@pytest.mark.parametrize("name", ["adamw", pytest.param("muon", marks=pytest.mark.slow)])
def test_bf16_master_weights_keep_their_dtypes_and_compile_once(name):
    """bf16 parameters and moments stay bf16 after float32 updates: the state always matches the abstract
    state (what checkpoints restore into) and the step compiles once."""
    mesh = make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    cfg = SMALL.replace(param_dtype="bfloat16")
    trainer = Trainer.build(cfg, OptimConfig(name=name, learning_rate=1e-2, warmup_steps=2),
                            TrainConfig(steps=10, microbatches=2), mesh)
    want = jax.tree.map(lambda a: a.dtype, trainer.abstract_state)
    assert jnp.bfloat16 in jax.tree.leaves(want["params"])
    with jax.set_mesh(mesh):
        state = trainer.init()
        for s in range(3):
            state, m = trainer.step(state, global_batch(_batch(seed=s), mesh))
            assert jax.tree.map(lambda a: a.dtype, state) == want
    assert trainer.step._cache_size() == 1 and np.isfinite(float(m["loss"]))


@SHARED
def test_weight_decay_mask_spares_norms_gates_and_embeddings():
    trainer = _trainer(MeshConfig(fsdp=1), jax.devices()[:1])
    abs_params = nnx.state(nnx.eval_shape(lambda: trainer.model(trainer.init())), nnx.Param)
    flat = {p: m for p, m in _flat(decay_mask(abs_params, decay_embeddings=False))}
    assert not flat[("embed_tokens",)] and flat[("lm_head",)]
    assert not flat[("layers", 0, "self_attn", "A_log")] and not flat[("layers", 0, "self_attn", "dt_bias")]
    assert not flat[("layers", 0, "input_layernorm", "weight")]
    assert not flat[("layers", 0, "self_attn", "o_norm", "weight")]
    assert flat[("layers", 0, "self_attn", "q_proj", "kernel")] and flat[("layers", 1, "block_sparse_moe", "w1")]
    assert not flat[("layers", 1, "self_attn", "kv_a_layernorm", "weight")]
    assert dict(_flat(decay_mask(abs_params, decay_embeddings=True)))[("embed_tokens",)]


def _flat(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def test_schedules():
    wsd = schedule(OptimConfig(schedule="wsd", learning_rate=1.0, warmup_steps=10, decay_fraction=0.2,
                               min_lr_ratio=0.1), 100)
    assert float(wsd(0)) == 0 and float(wsd(5)) == pytest.approx(0.5)
    assert float(wsd(10)) == float(wsd(79)) == pytest.approx(1.0)
    assert float(wsd(90)) == pytest.approx(0.55) and float(wsd(100)) == pytest.approx(0.1)
    cos = schedule(OptimConfig(schedule="cosine", learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1), 100)
    assert float(cos(10)) == pytest.approx(1.0) and float(cos(100)) == pytest.approx(0.1)
    assert float(cos(55)) == pytest.approx(0.55, abs=1e-6)


def test_mesh_shapes_and_errors():
    assert mesh_shape(MeshConfig(), 8) == (1, 8, 1, 1)
    assert mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2, 1)
    with pytest.raises(ValueError, match="at most one"):
        mesh_shape(MeshConfig(data=-1, fsdp=-1), 8)
    with pytest.raises(ValueError, match="needs 6 devices"):
        mesh_shape(MeshConfig(data=3, fsdp=2), 8)
