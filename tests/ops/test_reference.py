"""The oracle itself against an independent NumPy float64 loop of kda_spec §1.2, and memory."""

import jax
import jax.numpy as jnp
import numpy as np

from kda_jax.ops import kda
from kda_jax.ops.inputs import resets_from_segment_ids
from kda_jax.ops.reference import kda_reference
from tests.ops.helpers import make_inputs


def numpy_recurrence(q, k, v, g, beta, h0, scale, resets):
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    o = np.zeros((B, T, HV, V))
    S = h0.copy()
    for b in range(B):
        for t in range(T):
            if resets[b, t]:
                S[b] = 0
            for h in range(HV):
                qh, kh = q[b, t, h // (HV // H)], k[b, t, h // (HV // H)]
                S[b, h] = np.exp(g[b, t, h])[:, None] * S[b, h]
                r = v[b, t, h] - S[b, h].T @ kh
                S[b, h] = S[b, h] + beta[b, t, h] * np.outer(kh, r)
                o[b, t, h] = S[b, h].T @ (scale * qh)
    return o, S


def test_reference_matches_numpy_loop():
    x = {n: np.asarray(a, np.float64) for n, a in make_inputs(2, 23, 1, 2, 8, 6, gate="strong", seed=1).items()}
    seg = np.array([[0] * 10 + [1] * 13, [0] * 23])
    resets = np.asarray(resets_from_segment_ids(jnp.asarray(seg)))
    o_np, S_np = numpy_recurrence(x["q"], x["k"], x["v"], x["g"], x["beta"], x["h0"], 0.3, resets)
    o, S = kda_reference(*(jnp.asarray(x[n]) for n in ("q", "k", "v", "g", "beta")), scale=0.3,
                         initial_state=jnp.asarray(x["h0"]), resets=jnp.asarray(resets))
    np.testing.assert_allclose(o, o_np, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(S, S_np, rtol=1e-12, atol=1e-12)


def test_chunked_fwd_bwd_memory_is_linear_in_T():
    """Compiled temporary memory of chunked forward+backward per token stays constant as T grows."""
    H, K, V = 4, 64, 64

    def temp_bytes(T):
        shp = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
        args = (shp(1, T, H, K), shp(1, T, H, K), shp(1, T, H, V), shp(1, T, H, K, dt=jnp.float32), shp(1, T, H))
        loss = lambda *a: jnp.sum(kda(*a, impl="chunked")[0].astype(jnp.float32))
        compiled = jax.jit(jax.grad(loss, argnums=range(5))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(1024), temp_bytes(4096)
    assert large <= 4.4 * small, (small, large)  # linear (a quadratic term would give ~16x)
    assert large / (4096 * H) < 64 * 1024, "more than 64 KB of temporaries per token-head"
