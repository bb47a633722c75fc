"""FLOPs per token: a hand count of a tiny dense model, MoE and sequence-length scaling, the
48B release against its activated parameter count, peak table and MFU."""

import jax
import pytest

from kda_jax.models import ModelConfig, count_params, get_config
from kda_jax.train.flops import flops_per_token, kda_core_flops_per_head, mfu, peak_flops_per_second

# 1 KDA layer + 1 MLA layer, both with dense SwiGLU MLPs.
TINY_DENSE = dict(vocab_size=10, hidden_size=8, num_hidden_layers=2, kda_layers=(1,), full_attn_layers=(2,),
                  pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  kda_num_heads=2, kda_head_dim=4, short_conv_kernel_size=4,
                  num_attention_heads=2, kv_lora_rank=6, qk_nope_head_dim=3, qk_rope_head_dim=2, v_head_dim=5,
                  intermediate_size=12, num_experts=0, chunk_size=32, dtype="float32")


def test_hand_count_tiny_dense():
    f = flops_per_token(ModelConfig(**TINY_DENSE), seq_len=9)
    head = 2 * 8 * 10
    # q, k, v, o 8->8; three depthwise convs of 4 taps on 8 channels; gates 8->4->8; beta 8->2
    kda_proj = 4 * (2 * 8 * 8) + 3 * (2 * 4 * 8) + 2 * (2 * 8 * 4 + 2 * 4 * 8) + 2 * 8 * 2
    # per head (kda_spec §7.2, dk = dv = 4, C = 32): 6·16 + 4·32·4 + 4·32·4 + 2·16³·2/32 + 450
    kda_core = 2 * (6 * 16 + 512 + 512 + 512 + 450)
    # q 8->2·5, kv_a 8->6+2, kv_b 6->2·(3+5), o 2·5->8
    mla_proj = 2 * 8 * 10 + 2 * 8 * 8 + 2 * 6 * 16 + 2 * 10 * 8
    # 9 tokens: query t sees t keys, 45 query-key pairs in all; per pair and head 2·5 (QK) + 2·5 (PV)
    attention = 45 * 2 * (2 * 5 + 2 * 5) / 9
    mlp = 2 * (3 * 2 * 8 * 12)
    expected = dict(embedding_head=head, kda_projections=kda_proj, kda_core=kda_core, mla_projections=mla_proj,
                    attention=attention, mlp=mlp, moe=0)
    for k, v in expected.items():
        assert f[k] == v, k
    assert f["forward"] == head + kda_proj + kda_core + mla_proj + attention + mlp == 7308
    assert f["train"] == 3 * 7308


def test_ablation_switches_change_projection_counts():
    base = ModelConfig(**TINY_DENSE)
    f = flops_per_token(base, 9)["kda_projections"]
    assert flops_per_token(base.replace(short_conv_kernel_size=0), 9)["kda_projections"] == f - 3 * 2 * 4 * 8
    assert flops_per_token(base.replace(output_gate="none"), 9)["kda_projections"] == f - (2 * 8 * 4 + 2 * 4 * 8)
    # GDN gate: hidden -> heads instead of hidden -> rank -> width; same core count
    gdn = flops_per_token(base.replace(kda_gate="gdn"), 9)
    assert gdn["kda_projections"] == f - (2 * 8 * 4 + 2 * 4 * 8) + 2 * 8 * 2
    assert gdn["kda_core"] == flops_per_token(base, 9)["kda_core"]
    q_lora = flops_per_token(base.replace(q_lora_rank=3), 9)["mla_projections"]
    assert q_lora == flops_per_token(base, 9)["mla_projections"] - 2 * 8 * 10 + 2 * 8 * 3 + 2 * 3 * 10


def test_additive_rule_counts_no_inverse_or_wy_part():
    base = ModelConfig(**TINY_DENSE)
    gdn = flops_per_token(base.replace(kda_gate="gdn"), 9)
    additive = flops_per_token(base.replace(kda_gate="gdn", kda_rule="additive"), 9)
    n_kda = sum(base.is_kda_layer(i) for i in range(base.num_hidden_layers))
    beta = n_kda * 2 * base.hidden_size * base.kda_num_heads
    assert additive["kda_projections"] == gdn["kda_projections"] - beta  # it writes with dt: no beta projection
    # per head (dk = dv = 4, C = 32): q·S and Kᵀ·V 2·(2·16), scores Q·Kᵀ 2·32·4, scores·V 2·32·4
    assert additive["kda_core"] == 2 * (4 * 16 + 256 + 256)
    assert additive["forward"] == gdn["forward"] - gdn["kda_core"] + additive["kda_core"] - beta
    assert kda_core_flops_per_head(128, 128, 64, rule="additive") == 98_304
    assert kda_core_flops_per_head(128, 128, 64, count="paper", rule="additive") == 98_304
    with pytest.raises(ValueError, match="rule"):
        kda_core_flops_per_head(128, 128, 64, rule="mamba")


def test_kda_core_counts_match_spec():
    assert kda_core_flops_per_head(128, 128, 64, count="paper") == 126_976  # kda_spec §7.1
    assert kda_core_flops_per_head(128, 128, 64) == pytest.approx(166e3, rel=0.01)  # §7.2 "≈ 166 K"
    assert kda_core_flops_per_head(128, 128, 32) == pytest.approx(132e3, rel=0.01)  # "≈ 132 K"
    with pytest.raises(ValueError):
        kda_core_flops_per_head(128, 128, 64, count="exact")
    cfg = get_config("tiny")
    paper = flops_per_token(cfg, 64, kda_count="paper")["kda_core"]
    assert paper == len(cfg.kda_layers) * cfg.kda_num_heads * (6 * 32 * 32 + 3 * 64 * 32 + 64 * 64)


def test_moe_counts_activated_experts_only():
    cfg = get_config("tiny")  # 8 experts, top-2, 1 shared, width 32, hidden 64
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    assert n_moe > 0
    moe = lambda **kw: flops_per_token(cfg.replace(**kw), 128)["moe"]  # noqa: E731
    # more experts at fixed top-k: only the router matmul grows
    assert moe(num_experts=64) - moe(num_experts=8) == n_moe * 2 * 64 * 56
    # top-k: linear, one SwiGLU expert per extra k
    per_k = [moe(num_experts_per_token=k) for k in (1, 2, 3, 4)]
    assert {b - a for a, b in zip(per_k, per_k[1:])} == {n_moe * 3 * 2 * 64 * 32}
    assert moe() == n_moe * (2 * 64 * 8 + (2 + 1) * 3 * 2 * 64 * 32)
    dense = flops_per_token(cfg.replace(num_experts=0), 128)
    assert dense["moe"] == 0 and dense["mlp"] == cfg.num_hidden_layers * 3 * 2 * 64 * 128


def test_sequence_length_scaling():
    cfg = get_config("small")
    f = {T: flops_per_token(cfg, T) for T in (1024, 2048, 3072, 8192)}
    # attention per token is linear in T; everything else does not depend on T
    assert f[3072]["attention"] - f[2048]["attention"] == f[2048]["attention"] - f[1024]["attention"] > 0
    for k in ("embedding_head", "kda_projections", "kda_core", "mla_projections", "mlp", "moe"):
        assert f[1024][k] == f[8192][k], k
    # the all-MLA twin spends more on attention, and at long context more in all
    for T in (4096, 131072):
        hybrid, mla = flops_per_token(cfg, T), flops_per_token(get_config("small_mla_only"), T)
        assert mla["attention"] > hybrid["attention"]
        assert mla["kda_core"] == mla["kda_projections"] == 0
    assert flops_per_token(get_config("small_mla_only"), 131072)["forward"] > f[8192]["forward"] * 2


def test_48b_forward_is_twice_activated_params_plus_mixing():
    cfg = get_config("kimi_linear_48b_a3b")
    _, activated = count_params(cfg, exclude_embeddings=True)
    f = flops_per_token(cfg, 4096)
    weights = f["kda_projections"] + f["mla_projections"] + f["mlp"] + f["moe"]
    # every matmul weight is used once per token; the remaining parameters (norms, A_log,
    # dt_bias, router biases: ~0.1 M of 2.7 B) do no matmul
    assert 2 * activated * (1 - 1e-3) <= weights <= 2 * activated
    head = 2 * cfg.hidden_size * cfg.vocab_size
    mixing = f["attention"] + f["kda_core"]
    assert 2 * activated * (1 - 1e-3) + head + mixing <= f["forward"] <= 2 * activated + head + mixing
    # kimi_linear_model §1.6: ~2.73 B activated non-embedding parameters
    assert 6.0e9 < f["forward"] < 7.5e9
    # 7 MLA layers at 4K: H·(192+128)·(T+1) each; 20 KDA layers of 32 heads at ~166 K per head
    assert f["attention"] == 7 * 32 * 320 * 4097
    assert f["kda_core"] == 20 * 32 * kda_core_flops_per_head(128, 128, 64)


def test_peak_table():
    assert peak_flops_per_second("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_flops_per_second("NVIDIA H100 80GB HBM3", "float32") == 494.7e12
    assert peak_flops_per_second("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_per_second("NVIDIA H200") == 989.4e12
    assert peak_flops_per_second("NVIDIA A100-SXM4-80GB", "float16") == 312e12
    assert peak_flops_per_second("TPU v5 lite") == 197e12
    assert peak_flops_per_second("TPU v5 lite", "float32") is None
    assert peak_flops_per_second("Some Future GPU") is None
    assert peak_flops_per_second(jax.devices("cpu")[0]) is None
    if jax.default_backend() == "cpu":
        assert peak_flops_per_second() is None
    with pytest.raises(ValueError):
        peak_flops_per_second("NVIDIA H100 80GB HBM3", "int8")


def test_mfu():
    cfg = get_config("small")
    train = flops_per_token(cfg, 2048)["train"]
    assert mfu(1e5, cfg, 2048, 989.4e12) == pytest.approx(1e5 * train / 989.4e12)
    assert mfu(1e5, cfg, 2048, None) is None
