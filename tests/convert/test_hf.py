"""Hugging Face interop: logits parity with transformers 5.24's Kimi-Linear, exact round trips, errors.

The fixtures under tests/fixtures/hf_kimi_linear/ come from tests/fixtures/make_hf_fixtures.py
(transformers' native ``KimiLinearForCausalLM`` in PyTorch on CPU, every parameter randomised).
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from kda_jax.convert import config_from_hf, config_to_hf, load_hf_checkpoint, save_hf_checkpoint
from kda_jax.models import HybridDecoder, get_config
from tests.layers.test_kda_mixer import ref_rel

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "hf_kimi_linear"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "expected.npz").is_file())


@jax.jit
def _logits(model, tokens):
    return model(tokens).logits


def test_fixtures_exist():
    assert {"hybrid_moe", "qlora_moe_norenorm"} <= set(CASES)


@pytest.mark.parametrize("dispatch", ["sorted", "dense"])
@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, dispatch):
    model = load_hf_checkpoint(FIXTURES / case, dtype="float32", moe_dispatch=dispatch)
    expected = np.load(FIXTURES / case / "expected.npz")
    logits = _logits(model, jnp.asarray(expected["input_ids"]))
    assert ref_rel(logits, expected["logits"]) < 1e-4


def test_biased_routing_weights_flag_changes_the_function():
    """transformers uses unbiased router weights; the remote code's biased ones do not match it."""
    expected = np.load(FIXTURES / "hybrid_moe" / "expected.npz")
    model = load_hf_checkpoint(FIXTURES / "hybrid_moe", dtype="float32", router_bias_in_weights=True)
    assert ref_rel(_logits(model, jnp.asarray(expected["input_ids"])), expected["logits"]) > 1e-2


def _state(model):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("case", ["hybrid_moe", "qlora_moe_norenorm"])
def test_export_then_import_is_exact_and_keeps_the_released_names(case, tmp_path):
    model = load_hf_checkpoint(FIXTURES / case, dtype="float32")
    save_hf_checkpoint(model, tmp_path)
    again = load_hf_checkpoint(tmp_path, dtype="float32")
    a, b = _state(model), _state(again)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))
    from safetensors import safe_open
    ours = {k: tuple(safe_open(str(tmp_path / "model.safetensors"), "numpy").get_slice(k).get_shape())
            for k in safe_open(str(tmp_path / "model.safetensors"), "numpy").keys()}
    f = safe_open(str(FIXTURES / case / "model.safetensors"), "numpy")
    theirs = {k.replace("block_sparse_moe.gate_proj", "mlp.gate_proj").replace("block_sparse_moe.up_proj", "mlp.up_proj")
              .replace("block_sparse_moe.down_proj", "mlp.down_proj"): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert ours == theirs
    assert config_from_hf(tmp_path, dtype="float32") == config_from_hf(FIXTURES / case, dtype="float32")


def test_sharded_export_writes_an_index_and_reloads(tmp_path):
    model = HybridDecoder(get_config("tiny"), rngs=nnx.Rngs(3))
    save_hf_checkpoint(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = load_hf_checkpoint(tmp_path, dtype="float32")
    for path, value in _state(model).items():
        np.testing.assert_array_equal(value, _state(again)[path])


def test_streaming_load_places_every_parameter_on_its_sharding():
    mesh = jax.make_mesh((1, 2, 2, 2), ("data", "fsdp", "tensor", "expert"), axis_types=(AxisType.Auto,) * 4)
    plain = load_hf_checkpoint(FIXTURES / "hybrid_moe", dtype="float32")
    sharded = load_hf_checkpoint(FIXTURES / "hybrid_moe", mesh=mesh, dtype="float32")
    flat = dict(nnx.to_flat_state(nnx.state(sharded)))
    w1 = flat[("layers", 1, "block_sparse_moe", "w1")].get_value()
    assert w1.sharding.spec == jax.sharding.PartitionSpec("expert", "fsdp", "tensor")
    q = flat[("layers", 0, "self_attn", "q_proj", "kernel")].get_value()
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert len({s.device for s in q.addressable_shards}) == 8
    for path, value in _state(plain).items():
        np.testing.assert_array_equal(value, np.asarray(flat[path].get_value()), err_msg=str(path))


def test_released_style_config_without_layer_types():
    preset = get_config("kimi_linear_48b_a3b")
    hf = config_to_hf(preset)
    del hf["layer_types"], hf["mlp_layer_types"]
    assert config_from_hf(hf, dtype="bfloat16") == preset


def test_bad_checkpoints_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config file"):
        load_hf_checkpoint(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    shutil.copytree(FIXTURES / "hybrid_moe", bad)
    (bad / "model.safetensors").write_bytes((bad / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read"):
        load_hf_checkpoint(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_checkpoint(bad)
    cfg = json.loads((FIXTURES / "hybrid_moe" / "config.json").read_text())
    shutil.copy(FIXTURES / "hybrid_moe" / "model.safetensors", bad / "model.safetensors")
    (bad / "config.json").write_text(json.dumps(dict(cfg, moe_intermediate_size=9)))
    with pytest.raises(ValueError, match=r"shared_experts.down_proj.weight: shape \(48, 8\) in the checkpoint, expected \(48, 9\)"):
        load_hf_checkpoint(bad)
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    with pytest.raises(ValueError, match="not a Kimi-Linear config"):
        load_hf_checkpoint(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_hf_checkpoint(bad)
    with pytest.raises(ValueError, match="Hugging Face layout"):
        save_hf_checkpoint(HybridDecoder(get_config("tiny_gdn_hybrid"), rngs=nnx.Rngs(0)), tmp_path / "gdn")
