"""Independent float64 NumPy references of the layers: written from kimi_linear_model §2, token loops."""

from __future__ import annotations

import numpy as np
from flax import nnx


def params_of(module) -> dict:
    """Nested dict of float64 NumPy arrays of a module's state."""
    import jax

    return jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(module)))


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softplus(x):
    return np.logaddexp(0.0, x)


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def starts(segment_ids, B, T):
    """[B, T] bool: a document starts at t."""
    if segment_ids is None:
        s = np.zeros((B, T), bool)
        s[:, 0] = True
        return s
    seg = np.asarray(segment_ids)
    return np.concatenate([np.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)


def short_conv(x, w, segment_ids=None):
    """x [B, T, C], w [W, C] (tap W-1 = current token); zeros before each document's start."""
    B, T, C = x.shape
    W = w.shape[0]
    st = starts(segment_ids, B, T)
    y = np.zeros_like(x)
    for b in range(B):
        doc_start = 0
        for t in range(T):
            if st[b, t]:
                doc_start = t
            for j in range(W):
                s = t - (W - 1) + j
                if s >= doc_start:
                    y[b, t] += w[j] * x[b, s]
    return silu(y)


def kda_recurrence(q, k, v, g, beta, segment_ids=None):
    """o_t = S_t^T q_t with S_t = (I - β k kᵀ) Diag(exp g) S_{t-1} + β k vᵀ; S restarts per document."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    st = starts(segment_ids, B, T)
    o = np.zeros((B, T, H, V))
    for b in range(B):
        for h in range(H):
            S = np.zeros((K, V))
            for t in range(T):
                if st[b, t]:
                    S = np.zeros((K, V))
                S = np.exp(g[b, t, h])[:, None] * S
                kt = k[b, t, h]
                S = S + beta[b, t, h] * np.outer(kt, v[b, t, h] - S.T @ kt)
                o[b, t, h] = S.T @ q[b, t, h]
    return o


def kda_layer(p, x, *, H, K, conv=True, gate="kda", output_gate="sigmoid", eps=1e-5, segment_ids=None,
              write="beta"):
    """The KDA mixer of §2.2 from its parameters (kernels ``[in, out]``). ``write="dt"`` (scalar
    gate only): the write strength is the decay's step softplus(f) instead of sigmoid(b_proj x),
    as in Mamba2's discretisation (the additive, Mamba2-like baseline)."""
    B, T, _ = x.shape
    heads = lambda a: a.reshape(B, T, H, K)
    l2 = lambda a: a / np.sqrt(np.sum(a * a, axis=-1, keepdims=True) + 1e-6)

    def branch(name):
        y = x @ p[f"{name}_proj"]["kernel"]
        y = short_conv(y, p[f"{name}_conv1d"]["weight"], segment_ids) if conv else silu(y)
        return heads(y)

    q, k, v = l2(branch("q")) * K**-0.5, l2(branch("k")), branch("v")
    if gate == "kda":
        f = heads(x @ p["f_a_proj"]["kernel"] @ p["f_b_proj"]["kernel"]) + p["dt_bias"].reshape(H, K)
        g = -np.exp(p["A_log"])[:, None] * softplus(f)
    else:
        f = x @ p["f_proj"]["kernel"] + p["dt_bias"]
        g = np.repeat((-np.exp(p["A_log"]) * softplus(f))[..., None], K, axis=-1)
    beta = softplus(f) if write == "dt" else sigmoid(x @ p["b_proj"]["kernel"])
    o = kda_recurrence(q, k, v, g, beta, segment_ids)
    o = rms_norm(o, p["o_norm"]["weight"], eps)
    if output_gate != "none":
        gt = heads(x @ p["g_a_proj"]["kernel"] @ p["g_b_proj"]["kernel"])
        o = o * (sigmoid(gt) if output_gate == "sigmoid" else silu(gt))
    return o.reshape(B, T, H * K) @ p["o_proj"]["kernel"]


def mla_layer(p, x, *, H, nope, rope, v_dim, kv_lora, eps=1e-6, segment_ids=None):
    """NoPE MLA of §2.3, one head and one query at a time."""
    B, T, _ = x.shape
    if "q_proj" in p:
        q = x @ p["q_proj"]["kernel"]
    else:
        q = rms_norm(x @ p["q_a_proj"]["kernel"], p["q_a_layernorm"]["weight"], eps) @ p["q_b_proj"]["kernel"]
    q = q.reshape(B, T, H, nope + rope)
    ckv = x @ p["kv_a_proj_with_mqa"]["kernel"]
    c = rms_norm(ckv[..., :kv_lora], p["kv_a_layernorm"]["weight"], eps)
    k_pe = ckv[..., kv_lora:]
    kv = (c @ p["kv_b_proj"]["kernel"]).reshape(B, T, H, nope + v_dim)
    seg = np.zeros((B, T), int) if segment_ids is None else np.asarray(segment_ids)
    o = np.zeros((B, T, H, v_dim))
    for b in range(B):
        for h in range(H):
            for i in range(T):
                js = [j for j in range(i + 1) if seg[b, j] == seg[b, i]]
                keys = np.stack([np.concatenate([kv[b, j, h, :nope], k_pe[b, j]]) for j in js])
                logits = keys @ q[b, i, h] / np.sqrt(nope + rope)
                w = np.exp(logits - logits.max())
                w /= w.sum()
                o[b, i, h] = w @ np.stack([kv[b, j, h, nope:] for j in js])
    return o.reshape(B, T, H * v_dim) @ p["o_proj"]["kernel"]
