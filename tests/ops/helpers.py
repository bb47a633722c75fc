"""Inputs, the relative-RMSE metric of kda_spec §5.3 and float64 oracle gradients for op tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kda_jax.ops import kda_reference

# kda_spec §5.3 thresholds (fla's tests/ops/test_kda.py)
TOL = {"o": 0.005, "state": 0.005, "q": 0.008, "k": 0.008, "v": 0.008, "h0": 0.008, "g": 0.02, "beta": 0.02}
GRAD_NAMES = ("q", "k", "v", "g", "beta", "h0")


def rel_rmse(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.sqrt(np.mean((x - ref) ** 2)) / max(np.sqrt(np.mean(ref**2)), 1e-30))


def assert_close(name: str, x, ref, tol: float) -> None:
    x64, ref64 = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert x64.shape == ref64.shape, f"{name}: shape {x64.shape} != {ref64.shape}"
    assert np.isfinite(x64).all(), f"{name}: non-finite values"
    if np.max(np.abs(x64 - ref64), initial=0.0) <= 1e-6:
        return
    err = rel_rmse(x64, ref64)
    assert err < tol, f"{name}: relative RMSE {err:.3e} >= {tol}"


def make_inputs(B, T, H, HV, K, V, *, dtype=jnp.float32, gate="normal", seed=0, h0=True):
    """Canonical inputs: L2-normalised q, k; g = -softplus(N(0,1)) (or strong / mild / zero); β = σ(N(0,1)).

    ``normal`` decays the state by ~e^{-50} over a 64-token chunk, so what crosses a whole chunk is
    ~0; ``mild`` (g × 0.02, e^{G_end} ~ 0.4) keeps it and what depends on it (dg through the state's
    decay) visible; ``strong`` adds −1000 entries and a run of −50; ``zero``: no decay."""
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(rng.standard_normal((B, T, H, K)))
    k = unit(rng.standard_normal((B, T, H, K)))
    v = rng.standard_normal((B, T, HV, V))
    g = -np.logaddexp(0.0, rng.standard_normal((B, T, HV, K)))
    if gate == "strong":
        g[rng.random(g.shape) < 0.05] = -1000.0
        g[:, T // 3 : T // 3 + 64, : max(1, HV // 2)] = -50.0
    elif gate == "mild":
        g *= 0.02
    elif gate == "zero":
        g[:] = 0.0
    beta = 1.0 / (1.0 + np.exp(-rng.standard_normal((B, T, HV))))
    state = rng.standard_normal((B, HV, K, V)).astype(np.float32) if h0 else None
    cast = lambda x: jnp.asarray(x, dtype)
    return dict(q=cast(q), k=cast(k), v=cast(v), g=jnp.asarray(g, jnp.float32), beta=jnp.asarray(beta, jnp.float32),
                h0=None if state is None else jnp.asarray(state))


def cotangents(o_shape, s_shape, seed=1):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(o_shape)), jnp.asarray(rng.standard_normal(s_shape))


def value_and_grads(fn, x, do, dS):
    """(o, S_T, grads dict) of loss = Σ o⊙dO + Σ S_T⊙dS through ``fn(q, k, v, g, beta, h0)``."""
    def loss(q, k, v, g, beta, h0):
        o, S = fn(q, k, v, g, beta, h0)
        return jnp.sum(o.astype(do.dtype) * do) + jnp.sum(S.astype(dS.dtype) * dS), (o, S)

    args = tuple(x[n] for n in GRAD_NAMES)
    grads, (o, S) = jax.grad(loss, argnums=tuple(range(6)), has_aux=True)(*args)
    return o, S, dict(zip(GRAD_NAMES, grads))


def oracle(x, scale=None, resets=None):
    """Float64 recurrence on the same (already rounded) inputs: outputs, final state and gradients."""
    x64 = {n: jnp.asarray(x[n], jnp.float64) for n in GRAD_NAMES}
    K = x["q"].shape[-1]
    scale = K**-0.5 if scale is None else scale
    fn = lambda q, k, v, g, beta, h0: kda_reference(q, k, v, g, beta, scale=scale, initial_state=h0, resets=resets)
    B, T, HV, V = x["v"].shape
    do, dS = cotangents((B, T, HV, V), (B, HV, K, V))
    return value_and_grads(fn, x64, do, dS), (do, dS)


def check_against_oracle(fn, x, resets=None, scale=None, label="", primal=False):
    """Run ``fn`` (q, k, v, g, beta, h0) -> (o, S_T) and compare everything with the f64 oracle.
    ``primal``: also the outputs of an undifferentiated call (a custom VJP's other forward)."""
    (o_ref, S_ref, g_ref), (do, dS) = oracle(x, scale=scale, resets=resets)
    if primal:
        o_p, S_p = jax.jit(fn)(*(x[n] for n in GRAD_NAMES))
        assert o_p.dtype == x["v"].dtype, f"{label} primal o dtype {o_p.dtype} != v dtype {x['v'].dtype}"
        assert_close(f"{label} primal o", o_p, o_ref, TOL["o"])
        assert_close(f"{label} primal state", S_p, S_ref, TOL["state"])
    o, S, grads = value_and_grads(fn, x, do, dS)
    assert o.dtype == x["v"].dtype, f"{label} o dtype {o.dtype} != v dtype {x['v'].dtype}"
    assert_close(f"{label} o", o, o_ref, TOL["o"])
    assert_close(f"{label} state", S, S_ref, TOL["state"])
    for n in GRAD_NAMES:
        assert grads[n].dtype == x[n].dtype, f"{label} d{n} dtype {grads[n].dtype} != {x[n].dtype}"
        assert_close(f"{label} d{n}", grads[n], g_ref[n], TOL[n])


def decode_inputs(B, S, H, HV, K, V, seed=0):
    """float32 decode inputs (q, k unit rows, 5% of gates −1000) and a random float32 state."""
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q, k = (jnp.asarray(unit(rng.standard_normal((B, S, H, K))), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((B, S, HV, V)), jnp.float32)
    g = -np.logaddexp(0.0, rng.standard_normal((B, S, HV, K)))
    g[rng.random(g.shape) < 0.05] = -1000.0  # Kimi Linear's unbounded gate
    beta = jnp.asarray(rng.random((B, S, HV)), jnp.float32)
    state = jnp.asarray(rng.standard_normal((B, HV, K, V)), jnp.float32)
    return q, k, v, jnp.asarray(g, jnp.float32), beta, state
