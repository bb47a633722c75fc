"""Model FLOPs per token and model-FLOPs utilisation (MFU) of the hybrid decoder.

Counts are FORWARD matmul FLOPs per token, 2 per multiply-add, read off the layer code
(``kda_jax.layers``) for one token of a sequence of ``seq_len`` tokens. Not counted, as usual
for MFU: norms, activations, softmax, gating elementwise work, the embedding lookup (a gather),
the loss, and the optimiser. ``train = 3 × forward`` is the standard forward + backward
convention (the backward pass costs two forward passes); recomputation under activation
checkpointing (``remat``) is NOT counted, so MFU stays comparable across remat policies
(hardware FLOPs utilisation would count it).

Per token, with D = hidden_size:

- ``embedding_head``: the LM head ``2·D·V`` (also when tied).
- ``kda_projections`` per KDA/GDN layer, W = H·d (kda_jax/layers/kda.py): q, k, v, o
  ``4·2·D·W``; short convs ``3·2·K·W`` (depthwise, K taps); forget gate ``2·D·r + 2·r·W``
  (low rank r, default d) or ``2·D·H`` (GDN); β ``2·D·H`` (delta rule only); output gate ``2·D·r + 2·r·W``
  unless ``output_gate == "none"``.
- ``kda_core`` per KDA/GDN layer: H × ``kda_core_flops_per_head`` (chunk C = ``chunk_size``).
  GDN layers use the same count (fla runs the same chunked algorithm for both). The additive
  rule (``kda_rule="additive"``, kda_jax/ops/additive.py) has no L, inverse, W or U:
  ``4·dk·dv + 2·C·dk + 2·C·dv`` (state read and write; the dense C×C scores and their
  product with V), under either ``kda_count``.
- ``mla_projections`` per MLA layer (kda_jax/layers/mla.py, K/V expanded per token, not
  absorbed): q ``2·D·H·(n+r)`` (or through ``q_lora_rank``), kv_a ``2·D·(L+r)``,
  kv_b ``2·L·H·(n+v)``, o ``2·H·v·D`` with n/r/v the nope/rope/value head dims, L = kv_lora_rank.
- ``attention`` per MLA layer: causal, so query t sees t keys and the mean over the sequence
  is (T+1)/2 keys; per key QKᵀ costs ``2·H·(n+r)`` and PV ``2·H·v``, in all
  ``H·(n+r+v)·(T+1)``. With packed documents a mask-skipping kernel does less; the count
  assumes one document spanning the sequence.
- ``mlp`` per dense layer: SwiGLU ``3·2·D·I``.
- ``moe`` per MoE layer, activated experts only: router ``2·D·E`` + (top-k + shared) experts
  ``3·2·D·F`` each. E changes only the router term.
"""

from __future__ import annotations

import jax

from kda_jax.models.config import ModelConfig

KDA_COUNTS = ("fla", "paper")
KDA_RULES = ("delta", "additive")
BLOCK = 16  # fla's secondary (sub-)chunk for the intra-chunk inverse (kda_spec §3.5)


def kda_core_flops_per_head(d_k: int, d_v: int, chunk: int, *, count: str = "fla", rule: str = "delta") -> int:
    """Forward FLOPs per token per head of chunkwise KDA with chunk size ``chunk``.

    ``count="fla"`` (default): kda_spec §7.2, what the fla kernels execute —
    ``6·dk·dv`` (state matmuls) + ``4·C·dk + 4·C·dv`` (Aqk and L blocks, W, U and the intra
    output, all dense) + the 16×16 block merges of the inverse, ``2·16³·n_blk/C`` with n_blk the
    number of block products (16 for C = 64, 2 for C = 32) + ≈450 for the diagonal forward
    substitution: ≈166 K (C = 64) / ≈132 K (C = 32) at d = 128.
    ``count="paper"``: kda_spec §7.1, paper Eq. 13, ``6·d² + 3·C·d + C²`` with d = dk (= dv in
    Kimi Linear): 126,976 at d = 128, C = 64; it seems to count only part of the C·d work.
    ``rule="additive"`` (no delta rule, ``ops.linear_attn``), for either count: ``2·dk·dv``
    (q·S) + ``2·dk·dv`` (the chunk's write Kᵀ·V) + ``2·C·dk`` (scores Q·Kᵀ, dense) + ``2·C·dv``
    (scores · V): 98,304 at d = 128, C = 64.
    """
    if count not in KDA_COUNTS:
        raise ValueError(f"KDA FLOP count must be one of {KDA_COUNTS}, got {count!r}")
    if rule not in KDA_RULES:
        raise ValueError(f"KDA rule must be one of {KDA_RULES}, got {rule!r}")
    if rule == "additive":
        return 4 * d_k * d_v + 2 * chunk * d_k + 2 * chunk * d_v
    if count == "paper":
        return 6 * d_k * d_v + 3 * chunk * d_k + chunk * chunk
    n = max(chunk // BLOCK, 1)
    # Inverse of a block lower-triangular matrix with n diagonal blocks: each off-diagonal block
    # at distance g needs g products plus one with the diagonal inverse, and there are n-g of them.
    n_blk = sum((n - g) * (g + 1) for g in range(1, n))
    merges = 2 * BLOCK**3 * n_blk // chunk
    return 6 * d_k * d_v + 4 * chunk * d_k + 4 * chunk * d_v + merges + 450


def _kda_projections(c: ModelConfig) -> int:
    D, H, W = c.hidden_size, c.kda_num_heads, c.kda_num_heads * c.kda_head_dim
    r = c.kda_head_dim if c.kda_gate_rank is None else c.kda_gate_rank
    flops = 4 * 2 * D * W                      # q, k, v, o
    flops += 3 * 2 * c.short_conv_kernel_size * W
    flops += 2 * D * r + 2 * r * W if c.kda_gate == "kda" else 2 * D * H
    if c.kda_rule == "delta":                  # beta (the additive rule writes with the decay's dt)
        flops += 2 * D * H
    if c.output_gate != "none":
        flops += 2 * D * r + 2 * r * W
    return flops


def _mla_projections(c: ModelConfig) -> int:
    D, H = c.hidden_size, c.num_attention_heads
    qk, L = c.qk_nope_head_dim + c.qk_rope_head_dim, c.kv_lora_rank
    q = 2 * D * c.q_lora_rank + 2 * c.q_lora_rank * H * qk if c.q_lora_rank else 2 * D * H * qk
    kv = 2 * D * (L + c.qk_rope_head_dim) + 2 * L * H * (c.qk_nope_head_dim + c.v_head_dim)
    return q + kv + 2 * H * c.v_head_dim * D


def _moe(c: ModelConfig) -> int:
    D = c.hidden_size
    experts = c.num_experts_per_token + c.num_shared_experts
    return 2 * D * c.num_experts + experts * 3 * 2 * D * c.moe_intermediate_size


def flops_per_token(config: ModelConfig, seq_len: int, *, kda_count: str = "fla") -> dict[str, int]:
    """Forward matmul FLOPs per token by component, ``forward`` (their sum) and ``train`` (3×).

    ``seq_len`` is the attention span (only the MLA ``attention`` term depends on it);
    ``kda_count`` picks the KDA core count (see ``kda_core_flops_per_head``).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    c = config
    out = dict(embedding_head=2 * c.hidden_size * c.vocab_size, kda_projections=0, kda_core=0,
               mla_projections=0, attention=0, mlp=0, moe=0)
    core = c.kda_num_heads * kda_core_flops_per_head(c.kda_head_dim, c.kda_head_dim, c.chunk_size, count=kda_count,
                                                     rule=c.kda_rule)
    attention = c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * (seq_len + 1)
    for i in range(c.num_hidden_layers):
        if c.is_kda_layer(i):
            out["kda_projections"] += _kda_projections(c)
            out["kda_core"] += core
        else:
            out["mla_projections"] += _mla_projections(c)
            out["attention"] += attention
        if c.is_moe_layer(i):
            out["moe"] += _moe(c)
        else:
            out["mlp"] += 3 * 2 * c.hidden_size * c.intermediate_size
    out["forward"] = sum(out.values())
    out["train"] = 3 * out["forward"]
    return out


# Dense (no structured sparsity) peak FLOP/s per chip from the vendors' datasheets: bf16/fp16
# tensor cores and, for float32, TF32 tensor cores — what XLA uses for float32 dots on Ampere and
# later at JAX's default matmul precision. TPUs have no float32 MXU peak: None. Matched as
# substrings of ``device_kind`` in this order (the more specific names first).
PEAKS: tuple[tuple[str, float, float | None], ...] = (
    # (device_kind substring, bf16/fp16, float32 as TF32)
    ("H100 PCIe", 756e12, 378e12),
    ("H100 NVL", 835.5e12, 417.5e12),
    ("H200 NVL", 835.5e12, 417.5e12),
    ("H100", 989.4e12, 494.7e12),        # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("H200", 989.4e12, 494.7e12),        # also GH200
    ("A100", 312e12, 156e12),
    ("TPU v4", 275e12, None),
    ("TPU v5 lite", 197e12, None),       # v5e
    ("TPU v5p", 459e12, None),
    ("TPU v5", 459e12, None),            # v5p reports "TPU v5"
    ("TPU v6 lite", 918e12, None),       # v6e (Trillium)
)
PEAK_DTYPES = ("bfloat16", "float16", "float32")


def peak_flops_per_second(device=None, dtype: str = "bfloat16") -> float | None:
    """Dense peak FLOP/s of one ``device`` (a ``jax.Device``, a ``device_kind`` string, or None for
    ``jax.devices()[0]``) for ``dtype``; None for CPUs and unknown accelerators."""
    if dtype not in PEAK_DTYPES:
        raise ValueError(f"dtype must be one of {PEAK_DTYPES}, got {dtype!r}")
    if device is None:
        device = jax.devices()[0]
    kind = device if isinstance(device, str) else device.device_kind
    for name, half, f32 in PEAKS:
        if name.lower() in kind.lower():
            return f32 if dtype == "float32" else half
    return None


def mfu(tokens_per_second: float, config: ModelConfig, seq_len: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation: ``tokens_per_second × train FLOPs per token / peak``.

    ``tokens_per_second`` and ``peak`` must cover the same devices (global throughput with
    ``peak = n_devices × peak_flops_per_second()``). None when the peak is unknown.
    """
    if peak is None or peak <= 0:
        return None
    return tokens_per_second * flops_per_token(config, seq_len)["train"] / peak
