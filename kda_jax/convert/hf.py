"""Hugging Face Kimi-Linear checkpoints ⇄ ``HybridDecoder``.

Reads a checkpoint directory (``config.json`` and ``model.safetensors`` or sharded
``model-*.safetensors`` with ``model.safetensors.index.json``) in the released layout and writes
the same layout back. Loading is lazy: each parameter is assembled by
``jax.make_array_from_callback`` from slices of the safetensors files, so every process reads only
the shards its devices hold and no host ever materialises the whole model.

Name and layout mapping (HF → ours): PyTorch Linear ``weight [out, in]`` → ``kernel [in, out]``;
short conv ``q/k/v_conv1d.weight [C, 1, W]`` → ``weight [W, C]`` (tap W-1 is the current token
in both); ``A_log [1, 1, H, 1]`` → ``[H]``; routed experts ``experts.{j}.w1/w3/w2`` (gate/up/down)
→ stacked ``w1/w3 [E, D, F]`` and ``w2 [E, F, D]``; the dense FFN is ``mlp.*`` in the released
checkpoint and ``block_sparse_moe.{gate,up,down}_proj`` in what transformers 5.24's
``save_pretrained`` writes (both are read; ``mlp.*`` is written).

Where the implementations differ (kimi_linear_model §9) and what we do:
- MoE routing weights: transformers 5.24 and vLLM gather the *unbiased* sigmoid scores (our
  default); the HF remote code adds the correction bias in place, so its weights are biased
  (``ModelConfig.router_bias_in_weights=True`` reproduces it). transformers renormalises top-1
  too and always multiplies by ``routed_scaling_factor`` (as we do); the remote code skips the
  renormalisation for top-1.
- ``kv_a_layernorm`` / ``q_a_layernorm`` eps: 1e-6 in the remote code and transformers, 1e-5 in
  vLLM; we read ``latent_norm_eps`` (default 1e-6).
- Layer kinds: transformers writes ``layer_types`` / ``mlp_layer_types`` and ignores
  ``moe_layer_freq``; the released config has 1-indexed ``linear_attn_config.kda_layers`` /
  ``full_attn_layers`` and ``first_k_dense_replace``. Both are read; all are written.
- ``tie_word_embeddings``: transformers never ties (its ``_tied_weights_keys`` is empty); the
  release is untied. We import untied and refuse to export a tied model.
- ``rope_theta``, top-level ``head_dim``, ``num_nextn_predict_layers`` and
  ``moe_router_activation_func`` (always sigmoid) are ignored. ``q_lora_rank`` is supported as in
  transformers (the remote code asserts it is null).
- No GDN checkpoints exist; a ``gdn_hybrid`` model cannot be exported.
"""

from __future__ import annotations

import json
import pathlib
from typing import Callable

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from kda_jax.models.config import ModelConfig, load_json
from kda_jax.models.decoder import HybridDecoder
from kda_jax.models.sharding import abstract_module, state_shardings

_RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "kda_impl", "attn_impl", "chunk_size", "moe_dispatch",
                   "router_bias_in_weights", "seq_aux_loss_coef")


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------
def config_from_hf(hf, **overrides) -> ModelConfig:
    """A ``ModelConfig`` from a HF Kimi-Linear ``config.json`` (a dict, file or directory)."""
    if not isinstance(hf, dict):
        hf = load_json(hf)
    if hf.get("model_type", "kimi_linear") != "kimi_linear":
        raise ValueError(f"not a Kimi-Linear config: model_type={hf.get('model_type')!r}")
    n = int(hf["num_hidden_layers"])
    lac = hf.get("linear_attn_config") or {}
    if "layer_types" in hf:
        types = hf["layer_types"]
        if len(types) != n or set(types) - {"linear_attention", "full_attention"}:
            raise ValueError(f"config layer_types must be {n} of 'linear_attention'/'full_attention', got {types}")
        kda = tuple(i + 1 for i, t in enumerate(types) if t == "linear_attention")
        full = tuple(i + 1 for i, t in enumerate(types) if t == "full_attention")
    elif "kda_layers" in lac or "full_attn_layers" in lac:
        kda, full = tuple(lac.get("kda_layers", ())), tuple(lac.get("full_attn_layers", ()))
    else:
        raise ValueError("config has neither layer_types nor linear_attn_config.kda_layers/full_attn_layers")
    first_dense = int(hf.get("first_k_dense_replace", 1))
    freq = int(hf.get("moe_layer_freq", 1))
    if "mlp_layer_types" in hf:
        kinds = hf["mlp_layer_types"]
        first_dense = next((i for i, t in enumerate(kinds) if t == "sparse"), n)
        freq = 1
        if kinds != ["dense"] * first_dense + ["sparse"] * (n - first_dense):
            raise ValueError(f"mlp_layer_types must be dense layers then sparse layers, got {kinds}")
    if hf.get("moe_router_activation_func", "sigmoid") != "sigmoid":
        raise ValueError("only the sigmoid MoE router of Kimi Linear is supported")
    if (hf.get("num_expert_group") or hf.get("n_group") or 1) != 1 or (hf.get("topk_group") or 1) != 1:
        raise ValueError("group-limited routing (num_expert_group/topk_group > 1) is not supported")
    if not hf.get("mla_use_nope", True):
        raise ValueError("mla_use_nope=false: no released Kimi-Linear checkpoint rotates its MLA keys")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r}: Kimi Linear uses silu")
    release = ModelConfig()  # absent keys take the release's values, as transformers' defaults do

    def get(*keys, field):
        for key in keys:  # the released name first, then transformers' aliases
            if hf.get(key) is not None:
                return hf[key]
        return getattr(release, field)

    fields = dict(
        vocab_size=get("vocab_size", field="vocab_size"), hidden_size=get("hidden_size", field="hidden_size"),
        num_hidden_layers=n, rms_norm_eps=get("rms_norm_eps", field="rms_norm_eps"), tie_word_embeddings=False,
        initializer_range=get("initializer_range", field="initializer_range"),
        pad_token_id=hf.get("pad_token_id"), bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
        kda_layers=kda, full_attn_layers=full,
        kda_num_heads=lac.get("num_heads", get("linear_num_heads", field="kda_num_heads")),
        kda_head_dim=lac.get("head_dim", get("linear_head_dim", field="kda_head_dim")),
        short_conv_kernel_size=lac.get("short_conv_kernel_size",
                                       get("linear_conv_kernel_dim", field="short_conv_kernel_size")),
        num_attention_heads=get("num_attention_heads", field="num_attention_heads"), q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=get("kv_lora_rank", field="kv_lora_rank"),
        qk_nope_head_dim=get("qk_nope_head_dim", field="qk_nope_head_dim"),
        qk_rope_head_dim=get("qk_rope_head_dim", field="qk_rope_head_dim"),
        v_head_dim=get("v_head_dim", field="v_head_dim"), mla_use_nope=True,
        intermediate_size=get("intermediate_size", field="intermediate_size"),
        num_experts=get("num_experts", "num_local_experts", field="num_experts"),
        num_experts_per_token=get("num_experts_per_token", "num_experts_per_tok", field="num_experts_per_token"),
        num_shared_experts=get("num_shared_experts", "n_shared_experts", field="num_shared_experts"),
        moe_intermediate_size=get("moe_intermediate_size", field="moe_intermediate_size"),
        first_k_dense_replace=first_dense, moe_layer_freq=freq,
        routed_scaling_factor=get("routed_scaling_factor", field="routed_scaling_factor"),
        moe_renormalize=get("moe_renormalize", "norm_topk_prob", field="moe_renormalize"))
    unknown = set(overrides) - set(_RUNTIME_FIELDS) - {"latent_norm_eps"}
    if unknown:
        raise ValueError(f"only runtime fields can be overridden on import, not {sorted(unknown)}")
    return ModelConfig(**fields, **overrides)


def config_to_hf(config: ModelConfig) -> dict:
    """The released-style ``config.json`` dict (also readable by transformers 5.24)."""
    c = config
    if c.kda_gate != "kda" or c.output_gate != "sigmoid" or not c.mla_use_nope or c.tie_word_embeddings:
        raise ValueError("only Kimi-Linear models (KDA gate, sigmoid output gate, NoPE MLA, untied head) "
                         "have a Hugging Face layout")
    if c.kda_gate_rank not in (None, c.kda_head_dim):
        raise ValueError("the HF layout has gate rank == head_dim")
    if c.short_conv_kernel_size == 0:
        raise ValueError("the HF layout always has a short conv")
    n = c.num_hidden_layers
    return {
        "architectures": ["KimiLinearForCausalLM"], "model_type": "kimi_linear", "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "num_hidden_layers": n, "rms_norm_eps": c.rms_norm_eps,
        "tie_word_embeddings": False, "initializer_range": c.initializer_range, "hidden_act": "silu",
        "pad_token_id": c.pad_token_id, "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
        "linear_attn_config": {"kda_layers": list(c.kda_layers), "full_attn_layers": list(c.full_attn_layers),
                               "num_heads": c.kda_num_heads, "head_dim": c.kda_head_dim,
                               "short_conv_kernel_size": c.short_conv_kernel_size},
        "layer_types": ["linear_attention" if c.is_kda_layer(i) else "full_attention" for i in range(n)],
        "mlp_layer_types": ["sparse" if c.is_moe_layer(i) else "dense" for i in range(n)],
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_attention_heads,
        "q_lora_rank": c.q_lora_rank, "kv_lora_rank": c.kv_lora_rank, "qk_nope_head_dim": c.qk_nope_head_dim,
        "qk_rope_head_dim": c.qk_rope_head_dim, "v_head_dim": c.v_head_dim, "mla_use_nope": True,
        "intermediate_size": c.intermediate_size, "num_experts": c.num_experts,
        "num_experts_per_token": c.num_experts_per_token, "num_shared_experts": c.num_shared_experts,
        "moe_intermediate_size": c.moe_intermediate_size, "first_k_dense_replace": c.first_k_dense_replace,
        "moe_layer_freq": c.moe_layer_freq, "routed_scaling_factor": c.routed_scaling_factor,
        "moe_renormalize": c.moe_renormalize, "moe_router_activation_func": "sigmoid",
        "use_grouped_topk": True, "num_expert_group": 1, "topk_group": 1, "num_nextn_predict_layers": 0,
    }


# ---------------------------------------------------------------------------------------------
# parameter mapping
# ---------------------------------------------------------------------------------------------
class _Map:
    """How one of our parameters is made from HF tensors: ``names`` and the layout ``kind``."""

    def __init__(self, names: list[str], kind: str):
        self.names, self.kind = names, kind


def _mapping(path: tuple, config: ModelConfig) -> _Map:
    """HF source of our parameter at ``path`` (a tuple of state keys)."""
    p = [str(x) for x in path]
    if p == ["embed_tokens"]:
        return _Map(["model.embed_tokens.weight"], "same")
    if p == ["lm_head"]:
        return _Map(["lm_head.weight"], "T")
    if p == ["norm", "weight"]:
        return _Map(["model.norm.weight"], "same")
    if p[0] != "layers":
        raise KeyError(path)
    pre = f"model.layers.{p[1]}."
    rest = p[2:]
    if rest[0] in ("input_layernorm", "post_attention_layernorm"):
        return _Map([pre + rest[0] + ".weight"], "same")
    if rest[0] == "mlp":  # dense FFN: released name first, then transformers' save_pretrained name
        name = rest[1] + ".weight"
        return _Map([pre + "mlp." + name, pre + "block_sparse_moe." + name], "T_alt")
    if rest[0] == "self_attn":
        name = pre + "self_attn." + rest[1]
        if rest[1] in ("A_log", "dt_bias"):
            return _Map([name], "a_log" if rest[1] == "A_log" else "same")
        if rest[1].endswith("_conv1d"):
            return _Map([name + ".weight"], "conv")
        if rest[-1] == "weight":  # o_norm, kv_a_layernorm, q_a_layernorm
            return _Map([name + ".weight"], "same")
        return _Map([name + ".weight"], "T")
    if rest[0] == "block_sparse_moe":
        moe = pre + "block_sparse_moe."
        if rest[1] == "gate":
            return _Map([moe + "gate.weight"], "T")
        if rest[1] == "e_score_correction_bias":
            return _Map([moe + "gate.e_score_correction_bias"], "same")
        if rest[1] in ("w1", "w2", "w3"):
            return _Map([f"{moe}experts.{j}.{rest[1]}.weight" for j in range(config.num_experts)], "experts")
        if rest[1] == "shared_experts":
            return _Map([f"{moe}shared_experts.{rest[2]}.weight"], "T")
    raise KeyError(path)


class _Reader:
    """Lazy access to the tensors of a checkpoint directory (one or many safetensors files)."""

    def __init__(self, directory: pathlib.Path):
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (directory / "model.safetensors").is_file():
            weight_map = None
        else:
            raise FileNotFoundError(f"{directory} has neither model.safetensors nor model.safetensors.index.json")
        self.files: dict[str, object] = {}
        self.where: dict[str, str] = {}
        for fname in sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]:
            fpath = directory / fname
            if not fpath.is_file():
                raise FileNotFoundError(f"checkpoint shard {fpath} listed in the index is missing")
            try:
                f = safe_open(str(fpath), framework="numpy")
            except Exception as e:  # safetensors raises its own error types
                raise ValueError(f"cannot read {fpath}: {e}") from e
            self.files[fname] = f
            for key in f.keys():
                self.where[key] = fname

    def has(self, name):
        return name in self.where

    def slice(self, name):
        return self.files[self.where[name]].get_slice(name)

    def shape(self, name):
        return tuple(self.slice(name).get_shape())


def _resolve(m: _Map, reader: _Reader, path) -> _Map:
    if m.kind == "T_alt":
        found = [n for n in m.names if reader.has(n)]
        if not found:
            raise KeyError(f"checkpoint is missing {m.names[0]} (or {m.names[1]}) for parameter {path}")
        return _Map(found[:1], "T")
    missing = [n for n in m.names if not reader.has(n)]
    if missing:
        raise KeyError(f"checkpoint is missing {missing[0]} for parameter {'.'.join(map(str, path))}"
                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return m


def _hf_shape(m: _Map, shape):
    """The HF tensor shape that maps onto our parameter ``shape``."""
    if m.kind == "same":
        return tuple(shape)
    if m.kind == "T":
        return tuple(shape[::-1])
    if m.kind == "conv":
        return (shape[1], 1, shape[0])
    if m.kind == "a_log":
        return (1, 1, shape[0], 1)
    if m.kind == "experts":
        return tuple(shape[1:][::-1])
    raise AssertionError(m.kind)


def _reader_fn(m: _Map, reader: _Reader, dtype) -> Callable:
    """``index -> np.ndarray`` of our parameter, reading only the requested slice of the HF tensors."""

    def read(idx):
        if m.kind == "same":
            return reader.slice(m.names[0])[idx]
        if m.kind == "T":
            return reader.slice(m.names[0])[idx[::-1]].T
        if m.kind == "conv":  # ours [W, C] <- HF [C, 1, W]
            return reader.slice(m.names[0])[idx[1], 0:1, idx[0]][:, 0, :].T
        if m.kind == "a_log":
            return reader.slice(m.names[0])[0:1, 0:1, idx[0], 0:1].reshape(-1)
        if m.kind == "experts":  # ours [E, a, b] <- HF experts.{j} [b, a]
            rows = range(*idx[0].indices(len(m.names)))
            return np.stack([reader.slice(m.names[j])[idx[2], idx[1]].T for j in rows])
        raise AssertionError(m.kind)

    return lambda idx: np.asarray(read(tuple(idx)), dtype)


def _to_hf_layout(kind, value):
    if kind == "T":
        return value.T
    if kind == "conv":  # ours [W, C] -> HF [C, 1, W]
        return value.T[:, None, :]
    if kind == "a_log":
        return value.reshape(1, 1, -1, 1)
    return value


def _full_index(shape):
    return tuple(slice(0, d) for d in shape)


def load_hf_checkpoint(directory, *, mesh=None, rules=None, **overrides) -> HybridDecoder:
    """``HybridDecoder`` with the weights of a HF Kimi-Linear checkpoint directory.

    With ``mesh`` every parameter is placed on its sharding from the logical rules and each
    device's shard is read from disk on its own; without it, on the default device.
    ``overrides`` set runtime fields of the config (dtype, kda_impl, ...).
    """
    directory = pathlib.Path(directory)
    config = config_from_hf(directory, **overrides)
    reader = _Reader(directory)
    abstract = abstract_module(lambda: HybridDecoder(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shardings = state_shardings(state, mesh, rules) if mesh is not None else None
    flat_shardings = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    used = set()
    for path, var in nnx.to_flat_state(state):
        target = var.get_value()
        m = _resolve(_mapping(path, config), reader, path)
        want = _hf_shape(m, target.shape)
        for name in m.names:
            got = reader.shape(name)
            if got != want:
                raise ValueError(f"{name}: shape {got} in the checkpoint, expected {want} for config "
                                 f"{directory / 'config.json'}")
        used.update(m.names)
        read = _reader_fn(m, reader, target.dtype)
        if mesh is None:
            value = jax.device_put(read(_full_index(target.shape)))
        else:
            value = jax.make_array_from_callback(target.shape, flat_shardings[path], read)
        var.set_value(value)
    unused = sorted(set(reader.where) - used)
    if unused:
        raise ValueError(f"checkpoint has {len(unused)} tensors the config does not use, e.g. {unused[:3]}")
    return nnx.merge(graphdef, state)


def save_hf_checkpoint(model: HybridDecoder, directory, *, dtype=None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write ``config.json`` and safetensors shards (+ index) in the released layout.

    ``dtype`` (e.g. ``ml_dtypes.bfloat16``) casts the tensors; default: the parameters' dtype.
    Parameters are gathered to this host one at a time.
    """
    directory = pathlib.Path(directory)
    config = model.config
    hf_config = config_to_hf(config)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        m = _mapping(path, config)
        value = np.asarray(jax.device_get(var.get_value()))
        if dtype is not None:
            value = value.astype(dtype)
        if m.kind == "T_alt":
            tensors[m.names[0]] = np.ascontiguousarray(value.T)
        elif m.kind == "experts":
            for j, name in enumerate(m.names):
                tensors[name] = np.ascontiguousarray(value[j].T)
        else:
            tensors[m.names[0]] = np.ascontiguousarray(_to_hf_layout(m.kind, value))
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        total = sum(t.nbytes for t in tensors.values())
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2))


__all__ = ["config_from_hf", "config_to_hf", "load_hf_checkpoint", "save_hf_checkpoint"]
