"""``ModelConfig``: the fields of the Hugging Face Kimi-Linear config, plus runtime choices.

Layer lists are 1-indexed as in the HF ``linear_attn_config`` (``kda_layers``,
``full_attn_layers``); every layer is in exactly one of them. Layer ``i`` (0-indexed) has a
routed MoE when ``num_experts > 0``, ``i >= first_k_dense_replace`` and
``i % moe_layer_freq == 0``, else the dense SwiGLU of width ``intermediate_size``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 163840
    hidden_size: int = 2304
    num_hidden_layers: int = 27
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    pad_token_id: int | None = 163839
    bos_token_id: int | None = 163584
    eos_token_id: int | None = 163586
    # Layer pattern (1-indexed, as in the HF linear_attn_config).
    kda_layers: tuple[int, ...] = (1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26)
    full_attn_layers: tuple[int, ...] = (4, 8, 12, 16, 20, 24, 27)
    # KDA mixer.
    kda_num_heads: int = 32
    kda_head_dim: int = 128
    short_conv_kernel_size: int = 4        # 0: no short conv (ablation)
    kda_gate: str = "kda"                  # "kda" per-channel | "gdn" scalar per head
    kda_rule: str = "delta"                # "delta" (KDA/GDN) | "additive" (no delta rule; needs kda_gate="gdn")
    output_gate: str = "sigmoid"           # "sigmoid" | "swish" | "none"
    kda_gate_rank: int | None = None       # low-rank gate bottleneck; None = kda_head_dim
    # MLA mixer.
    num_attention_heads: int = 32
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    mla_use_nope: bool = True
    latent_norm_eps: float = 1e-6          # q_a/kv_a_layernorm: 1e-6 in HF (remote and transformers), 1e-5 in vLLM
    rope_theta: float = 10000.0
    # Feed-forward / MoE.
    intermediate_size: int = 9216
    num_experts: int = 256
    num_experts_per_token: int = 8
    num_shared_experts: int = 1
    moe_intermediate_size: int = 1024
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    routed_scaling_factor: float = 2.446
    moe_renormalize: bool = True
    router_bias_in_weights: bool = False   # True: the HF remote code's biased routing weights
    seq_aux_loss_coef: float = 0.0
    moe_dispatch: str = "sorted"           # "sorted" (ragged_dot, dropless) | "dense" (reference)
    # Runtime.
    dtype: str = "bfloat16"                # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"                    # "none" | "full" | "dots"
    kda_impl: str = "auto"
    attn_impl: str = "auto"
    chunk_size: int = 64

    def __post_init__(self):
        for name in ("kda_layers", "full_attn_layers"):
            object.__setattr__(self, name, tuple(int(i) for i in getattr(self, name)))
        self.validate()

    def validate(self):
        def bad(msg):
            raise ValueError(f"invalid ModelConfig: {msg}")

        n = self.num_hidden_layers
        if n < 1:
            bad(f"num_hidden_layers must be >= 1, got {n}")
        kda, full = set(self.kda_layers), set(self.full_attn_layers)
        if len(kda) != len(self.kda_layers) or len(full) != len(self.full_attn_layers):
            bad("kda_layers / full_attn_layers contain duplicates")
        if kda & full:
            bad(f"layers {sorted(kda & full)} are in both kda_layers and full_attn_layers")
        if kda | full != set(range(1, n + 1)):
            missing = sorted(set(range(1, n + 1)) - kda - full)
            extra = sorted((kda | full) - set(range(1, n + 1)))
            bad(f"kda_layers and full_attn_layers (1-indexed) must cover layers 1..{n} exactly; "
                f"missing {missing}, out of range {extra}")
        if self.kda_gate not in ("kda", "gdn"):
            bad(f"kda_gate must be 'kda' or 'gdn', got {self.kda_gate!r}")
        if self.kda_rule not in ("delta", "additive"):
            bad(f"kda_rule must be 'delta' or 'additive', got {self.kda_rule!r}")
        if self.kda_rule == "additive" and self.kda_gate != "gdn":
            bad(f"kda_rule='additive' needs the scalar decay kda_gate='gdn', got kda_gate={self.kda_gate!r}")
        if self.output_gate not in ("sigmoid", "swish", "none"):
            bad(f"output_gate must be 'sigmoid', 'swish' or 'none', got {self.output_gate!r}")
        if self.num_experts and not 1 <= self.num_experts_per_token <= self.num_experts:
            bad(f"num_experts_per_token must be in [1, num_experts={self.num_experts}], "
                f"got {self.num_experts_per_token}")
        if self.moe_layer_freq < 1:
            bad(f"moe_layer_freq must be >= 1, got {self.moe_layer_freq}")
        if self.moe_dispatch not in ("sorted", "dense"):
            bad(f"moe_dispatch must be 'sorted' or 'dense', got {self.moe_dispatch!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                bad(f"{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}")
        if self.remat not in REMAT_POLICIES:
            bad(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.chunk_size not in (32, 64):
            bad(f"chunk_size must be 32 or 64, got {self.chunk_size}")
        for name in ("vocab_size", "hidden_size", "kda_num_heads", "kda_head_dim", "num_attention_heads",
                     "kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "intermediate_size"):
            if getattr(self, name) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")

    # Derived layout -------------------------------------------------------------------------
    def is_kda_layer(self, i: int) -> bool:
        """Whether 0-indexed layer i is a KDA (or GDN) layer."""
        return (i + 1) in self.kda_layers

    def is_moe_layer(self, i: int) -> bool:
        return bool(self.num_experts) and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return DTYPES[self.param_dtype]

    def replace(self, **changes) -> "ModelConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def hybrid_layout(num_layers: int, kda_per_mla: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """1-indexed (kda_layers, full_attn_layers) with ``kda_per_mla`` KDA layers per MLA layer.

    MLA sits at every ``kda_per_mla + 1``-th layer and at the last layer (as in the release:
    27 layers at 3:1 give MLA at 4, 8, ..., 24 and 27). ``kda_per_mla=0`` is all MLA.
    """
    if kda_per_mla < 0:
        raise ValueError(f"kda_per_mla must be >= 0, got {kda_per_mla}")
    full = {i for i in range(1, num_layers + 1) if i % (kda_per_mla + 1) == 0} | {num_layers}
    kda = tuple(i for i in range(1, num_layers + 1) if i not in full)
    return kda, tuple(sorted(full))


def load_json(path) -> dict:
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
