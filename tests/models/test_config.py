import dataclasses

import pytest
from flax import nnx

from kda_jax.models import (HybridDecoder, ModelConfig, config_names, count_params, get_config, hybrid_layout,
                            variant)


def test_release_preset_layout_and_parameter_counts():
    c = get_config("kimi_linear_48b_a3b")
    assert c.full_attn_layers == (4, 8, 12, 16, 20, 24, 27) and len(c.kda_layers) == 20
    assert [i for i in range(27) if not c.is_kda_layer(i)] == [3, 7, 11, 15, 19, 23, 26]
    assert not c.is_moe_layer(0) and all(c.is_moe_layer(i) for i in range(1, 27))
    total, active = count_params(c)
    assert abs(total / 1e9 - 49.12) < 0.01              # kimi_linear_model §1.6
    assert abs(active / 1e9 - 3.48) < 0.01              # both embedding matrices counted
    _, active_ne = count_params(c, exclude_embeddings=True)
    assert abs(active_ne / 1e9 - 2.73) < 0.01           # "3B activated" in the paper


def test_component_counts_of_the_release_by_hand():
    c = get_config("kimi_linear_48b_a3b")
    d, hk = 2304, 32 * 128
    kda = 3 * d * hk + 3 * 4 * hk + 2 * (d * 128 + 128 * hk) + hk + 32 + d * 32 + 128 + hk * d
    mla = d * 32 * 192 + d * 576 + 512 + 512 * 32 * 256 + 32 * 128 * d
    moe = d * 256 + 256 + 256 * 3 * d * 1024 + 3 * d * 1024
    dense, norms, emb = 3 * d * 9216, 2 * d, 163840 * d
    want = 20 * kda + 7 * mla + 26 * moe + dense + 27 * norms + d + 2 * emb
    assert count_params(c)[0] == want


@pytest.mark.parametrize("name,active", [("scaling_653m", 653e6), ("scaling_878m", 878e6), ("scaling_1p1b", 1.1e9),
                                         ("scaling_1p4b", 1.4e9), ("scaling_1p7b", 1.7e9)])
def test_scaling_law_presets_match_paper_table_2(name, active):
    c = get_config(name)
    assert c.num_experts == 64 and c.num_experts_per_token + c.num_shared_experts == 8
    assert abs(count_params(c, exclude_embeddings=True)[1] / active - 1) < 0.015


def test_every_named_config_builds_abstractly():
    for name in config_names():
        model = nnx.eval_shape(lambda: HybridDecoder(get_config(name), rngs=nnx.Rngs(0)))
        assert len(model.layers) == get_config(name).num_hidden_layers


def _diff(a, b):
    return {f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)}


@pytest.mark.parametrize("base", ["tiny", "small", "kimi_linear_48b_a3b", "scaling_653m"])
def test_twins_differ_only_in_the_mixer(base):
    c = get_config(base)
    assert _diff(c, variant(c, "mla_only")) <= {"kda_layers", "full_attn_layers"}
    assert variant(c, "mla_only").kda_layers == ()
    assert _diff(c, variant(c, "gdn_hybrid")) == {"kda_gate"}
    assert get_config(base + "_gdn_hybrid") == variant(c, "gdn_hybrid")


def test_hybrid_layout_ratios():
    assert hybrid_layout(27, 3) == (get_config("kimi_linear_48b_a3b").kda_layers, (4, 8, 12, 16, 20, 24, 27))
    assert hybrid_layout(4, 0) == ((), (1, 2, 3, 4))
    assert hybrid_layout(16, 15) == (tuple(range(1, 16)), (16,))
    assert hybrid_layout(8, 1) == ((1, 3, 5, 7), (2, 4, 6, 8))


def test_unknown_names_and_broken_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="valid names: .*small_mla_only"):
        get_config("medium")
    with pytest.raises(ValueError, match="unknown variant"):
        variant(get_config("tiny"), "mamba")
    with pytest.raises(ValueError, match="both kda_layers and full_attn_layers"):
        get_config("tiny", full_attn_layers=(3, 4))
    with pytest.raises(ValueError, match=r"missing \[4\]"):
        ModelConfig(num_hidden_layers=4, kda_layers=(1, 2, 3), full_attn_layers=())
    with pytest.raises(ValueError, match="num_experts_per_token"):
        get_config("tiny", num_experts_per_token=9)
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        get_config("tiny").replace(hidden=3)
