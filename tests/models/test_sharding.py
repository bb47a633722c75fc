import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from kda_jax.models import HybridDecoder, get_config
from kda_jax.models.sharding import LOGICAL_RULES, create_sharded, logical_to_mesh
from tests.models.helpers import two_layer_config


def _mesh(shape):
    return jax.make_mesh(shape, ("data", "fsdp", "tensor", "expert"), axis_types=(AxisType.Auto,) * 4)


def test_logical_rules_resolve_and_reject_unknown_names():
    assert logical_to_mesh(("embed", "heads")) == P("fsdp", "tensor")
    assert logical_to_mesh(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)  # fsdp used once
    assert logical_to_mesh(("expert", "embed", "expert_mlp")) == P("expert", "fsdp", "tensor")
    with pytest.raises(ValueError, match="unknown logical axis 'hidden'"):
        logical_to_mesh(("hidden",))
    assert set(LOGICAL_RULES.values()) - {None} <= {"fsdp", "tensor", "expert", ("data", "fsdp")}


def test_sharded_init_places_parameters_by_the_rules_and_equals_unsharded_init():
    mesh = _mesh((1, 2, 2, 2))
    make = lambda: HybridDecoder(get_config("tiny"), rngs=nnx.Rngs(7))
    sharded = create_sharded(make, mesh)
    flat = {p: v for p, v in nnx.to_flat_state(nnx.state(sharded))}
    expect = {
        ("embed_tokens",): P("tensor", "fsdp"),
        ("lm_head",): P("fsdp", "tensor"),
        ("layers", 0, "self_attn", "q_proj", "kernel"): P("fsdp", "tensor"),
        ("layers", 0, "self_attn", "o_proj", "kernel"): P("tensor", "fsdp"),
        ("layers", 0, "self_attn", "q_conv1d", "weight"): P(None, "tensor"),
        ("layers", 0, "self_attn", "A_log"): P(None),
        ("layers", 0, "self_attn", "dt_bias"): P("tensor"),
        ("layers", 0, "mlp", "down_proj", "kernel"): P("tensor", "fsdp"),
        ("layers", 1, "block_sparse_moe", "w1"): P("expert", "fsdp", "tensor"),
        ("layers", 1, "block_sparse_moe", "w2"): P("expert", "tensor", "fsdp"),
        ("layers", 1, "block_sparse_moe", "e_score_correction_bias"): P(None),
        ("layers", 3, "self_attn", "kv_b_proj", "kernel"): P(None, "tensor"),
        ("layers", 3, "input_layernorm", "weight"): P(None),
    }
    for path, spec in expect.items():
        arr = flat[path].get_value()
        assert arr.sharding == NamedSharding(mesh, spec), (path, arr.sharding)
    for path, var in flat.items():  # every parameter is on the mesh
        assert var.get_value().sharding.mesh == mesh, path
    plain = make()  # eager init: the same random draws, up to float32 rounding of the fused jit
    for path, var in nnx.to_flat_state(nnx.state(plain)):
        np.testing.assert_allclose(np.asarray(var.get_value()), np.asarray(flat[path].get_value()), rtol=1e-6,
                                   atol=1e-7, err_msg=str(path))


def test_sharded_forward_equals_single_device_forward():
    mesh = _mesh((2, 2, 2, 1))
    make = lambda: HybridDecoder(two_layer_config(), rngs=nnx.Rngs(1))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 24)), jnp.int32)
    want = jax.jit(lambda m, t: m(t).logits)(make(), tokens)
    with jax.set_mesh(mesh):
        model = create_sharded(make, mesh)
        batch = jax.device_put(tokens, NamedSharding(mesh, logical_to_mesh(("batch", "length"))))
        got = jax.jit(lambda m, t: m(t).logits)(model, batch)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
