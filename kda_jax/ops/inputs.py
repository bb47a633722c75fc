"""Argument checking and the elementwise pre-processing shared by every KDA implementation.

Every implementation (reference, chunked, decode, GPU kernels) receives the same canonical
inputs, produced here once:

* q, k ``[B, T, H, K]`` (L2-normalised here when asked), v ``[B, T, HV, V]``;
* g ``[B, T, HV, K]`` float32 per-token log decay (the gate activation of kda_spec §2.4 is
  applied here when ``A_log`` is given);
* beta ``[B, T, HV]`` float32 (the sigmoid is applied here when ``beta_is_logit``);
* resets ``[B, T]`` bool or None: True where a new document starts (derived from segment ids);
* the initial state ``[B, HV, K, V]`` float32 or None.

The L2 norm (eps 1e-6 inside the square root, §1.3), the gate and the sigmoid are written in
plain JAX so that autodiff supplies their chain rules (§4.2 items 8–9).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

L2_EPS = 1e-6
CHUNK_SIZES = (32, 64)


@dataclasses.dataclass(frozen=True)
class Canonical:
    """Pre-processed inputs of one KDA call (see module docstring)."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    g: jax.Array
    beta: jax.Array
    initial_state: jax.Array | None
    resets: jax.Array | None
    scale: float


def _check_float(name: str, x) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype (float32, bfloat16, float16, float64), got {x.dtype}")


def _check_shape(name: str, x, expected: tuple, what: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {what} = {tuple(expected)}, got {tuple(x.shape)}")


def check_chunk_size(chunk_size) -> None:
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {CHUNK_SIZES}, got {chunk_size!r}")


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / sqrt(sum(x^2) + 1e-6) over the last axis, computed in float32, returned in x.dtype."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + L2_EPS)).astype(x.dtype)


def kda_gate(g_raw: jax.Array, A_log: jax.Array, dt_bias: jax.Array | None) -> jax.Array:
    """Kimi Linear's forget gate (kda_spec §2.4): a = -exp(A_log[h]) * softplus(g + dt_bias), float32.

    g_raw is ``[..., HV, D]`` with A_log ``[HV]`` and dt_bias ``[HV * D]`` (D = K for KDA; D = 1
    for the scalar GDN gate).
    """
    z = g_raw.astype(jnp.float32)
    if dt_bias is not None:
        z = z + dt_bias.astype(jnp.float32).reshape(z.shape[-2:])
    return -jnp.exp(A_log.astype(jnp.float32))[:, None] * jax.nn.softplus(z)


def resets_from_segment_ids(segment_ids: jax.Array) -> jax.Array:
    """True at every token whose segment id differs from the previous token's (never at t = 0)."""
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros_like(change[:, :1]), change], axis=1)


# Per-step log decays below this are a full reset in float32 (e^{-104} already underflows to 0), so
# clamping them changes no float32 result; it makes −inf (a hard reset) safe in the chunked forms,
# which take differences of in-chunk cumsums (−inf − (−inf) is NaN), and keeps those cumsums small.
GATE_FLOOR = -200.0


def apply_gate_floor(g: jax.Array) -> jax.Array:
    """max(g, ``GATE_FLOOR``): every canonical gate has been through this once."""
    return jnp.maximum(g, GATE_FLOOR)


def canonicalize(
    q, k, v, g, beta, *, scale=None, initial_state=None, segment_ids=None, use_qk_l2norm=False,
    A_log=None, dt_bias=None, beta_is_logit=False, scalar_gate=False, floor_gate=True,
) -> Canonical:
    """Validate a KDA (or, with ``scalar_gate``, GDN) call and return its canonical inputs.

    ``floor_gate=False`` leaves the decays below ``GATE_FLOOR`` as they are, for an implementation
    that applies ``apply_gate_floor`` itself (``registry.Impl.floors_gate``; ``kda`` floors after it
    has picked one)."""
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        _check_float(name, x)
    if q.ndim != 4:
        raise ValueError(f"q must have rank 4 [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    _check_shape("k", k, (B, T, H, K), "q.shape [B, T, H, K]")
    if v.ndim != 4 or tuple(v.shape[:2]) != (B, T):
        raise ValueError(f"v must have shape [B, T, HV, V] with B, T = {(B, T)} from q, got {tuple(v.shape)}")
    HV, V = v.shape[2], v.shape[3]
    if HV % H:
        raise ValueError(f"the number of value heads HV = {HV} (v.shape[2]) must be a multiple of H = {H} (q.shape[2])")
    if scalar_gate:
        _check_shape("g", g, (B, T, HV), "[B, T, HV] (one gate per value head)")
    else:
        _check_shape("g", g, (B, T, HV, K), "[B, T, HV, K]")
    _check_shape("beta", beta, (B, T, HV), "[B, T, HV]")
    if T == 0:
        raise ValueError("the sequence length T (q.shape[1]) must be at least 1")

    if initial_state is not None:
        _check_float("initial_state", initial_state)
        _check_shape("initial_state", initial_state, (B, HV, K, V), "[B, HV, K, V]")
        initial_state = initial_state.astype(jnp.float32)

    resets = None
    if segment_ids is not None:
        if not hasattr(segment_ids, "dtype") or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise TypeError(f"segment_ids must be an integer array [B, T], got {getattr(segment_ids, 'dtype', type(segment_ids))}")
        _check_shape("segment_ids", segment_ids, (B, T), "[B, T]")
        resets = resets_from_segment_ids(segment_ids)

    if scale is None:
        scale = K ** -0.5
    elif not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}")

    gate_width = 1 if scalar_gate else K
    if A_log is not None:
        _check_float("A_log", A_log)
        _check_shape("A_log", A_log, (HV,), "[HV]")
        if dt_bias is not None:
            _check_float("dt_bias", dt_bias)
            _check_shape("dt_bias", dt_bias, (HV * gate_width,), "[HV]" if scalar_gate else "[HV * K]")
        g = kda_gate(g.reshape(B, T, HV, gate_width), A_log, dt_bias)
    elif dt_bias is not None:
        raise ValueError("dt_bias is only used with the in-op gate: pass A_log as well (or neither)")
    else:
        g = g.astype(jnp.float32).reshape(B, T, HV, gate_width)
    if floor_gate:
        g = apply_gate_floor(g)
    if scalar_gate:
        g = jnp.broadcast_to(g, (B, T, HV, K))

    beta = jax.nn.sigmoid(beta.astype(jnp.float32)) if beta_is_logit else beta.astype(jnp.float32)
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    return Canonical(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state, resets=resets, scale=float(scale))


def expand_heads(x: jax.Array, hv: int) -> jax.Array:
    """Repeat q/k heads so value head h reads q/k head h // (HV / H) (grouped value heads)."""
    rep = hv // x.shape[2]
    return x if rep == 1 else jnp.repeat(x, rep, axis=2)


def pad_time(x: jax.Array | None, multiple: int, axis: int = 1, value=0):
    """Pad axis ``axis`` up to a multiple of ``multiple``. Zero q/k/v/g/beta tokens are exact no-ops."""
    if x is None:
        return None
    pad = -x.shape[axis] % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)
