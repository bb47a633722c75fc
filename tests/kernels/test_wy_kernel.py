"""``kda_jax.kernels.wy.forward_factors`` (W, U, Kd, Qs in one kernel) and ``wy.wy_adjoint`` (the backward
through them and the inverse) against the float64 XLA forms (``kda_jax.ops.chunked._wy``,
``ScanPasses.wy_adjoint``). CPU: interpret mode. GPU (``-m gpu``, ``KDA_TEST_GPU=1``): compiled.
End-to-end outputs and gradients through the kernels: test_mosaic.py (``factors_kernel=True``,
``wy_adjoint_kernel=True``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kda_jax.kernels import wy
from kda_jax.ops import chunked
from tests.kernels.test_blocks_kernel import _zones
from tests.kernels.test_intra_kernel import _inputs


def _check(shape, V, dtype, interpret, seed):
    N, B, H, C, K = shape
    q, k, G, rng = _inputs(*shape, dtype, seed)
    v = jnp.asarray(rng.standard_normal((N, B, H, C, V)), dtype)
    beta = jnp.asarray(rng.uniform(0.05, 1.0, (N, B, H, C)), jnp.float32)
    # T = (I + L)⁻¹ of a random strictly lower L of the size KDA gives (|L_ij| ≲ 1)
    L = np.tril(rng.uniform(-0.3, 0.3, (N, B, H, C, C)), -1)
    T = np.linalg.inv(np.eye(C) + L)
    z = _zones(N, B, C, rng)
    reads, writes = (z == 0).astype(np.float32), (z == z[..., -1:]).astype(np.float32)
    scale = K ** -0.5
    got = wy.forward_factors(q, k, v, G, beta, jnp.asarray(T, jnp.float32), jnp.asarray(reads), jnp.asarray(writes),
                             scale=scale, interpret=interpret)
    f64 = lambda x: jnp.asarray(np.asarray(jnp.asarray(x, jnp.float32), np.float64))
    zones = chunked._Zones(jnp.asarray(z.astype(np.int32))[:, :, None, :])
    f = chunked._wy(f64(k), f64(v), f64(beta), f64(G), jnp.asarray(T), zones)
    want = (f["W"], f["U"], f["Kd"], scale * f64(q) * f["Gamma"])
    # bf16 operands and output (each rounded by ≤ 2^-9): ~2e-3 relative RMSE at most
    _compare(("W", "U", "Kd", "Qs"), got, want, jnp.bfloat16, 4e-3)


def _compare(names, got, want, dtype, tol):
    """Each output in ``dtype``, finite, zero wherever the float64 one is (masks), within ``tol``
    relative RMSE of it."""
    for name, a, b in zip(names, got, want):
        assert a.dtype == dtype, name
        a, b = np.asarray(a, np.float64), np.asarray(b)
        assert np.isfinite(a).all(), name
        assert not a[b == 0].any(), f"{name}: nonzero where it must vanish (rows outside a zone, masked pairs)"
        rel = np.sqrt(np.sum((a - b) ** 2) / np.sum(b ** 2))
        assert rel < tol, f"{name}: relative RMSE {rel:.2e}"


def _check_adjoint(shape, V, dtype, interpret, seed, time_major=False):
    N, B, H, C, K = shape
    _, k, G, rng = _inputs(*shape, dtype, seed)
    v = jnp.asarray(rng.standard_normal((N, B, H, C, V)), dtype)
    beta = jnp.asarray(rng.uniform(0.05, 1.0, (N, B, H, C)), jnp.float32)
    T = np.linalg.inv(np.eye(C) + np.tril(rng.uniform(-0.3, 0.3, (N, B, H, C, C)), -1))
    h = jnp.asarray(rng.standard_normal((N, B, H, K, V)), dtype)
    dVn = jnp.asarray(rng.standard_normal((N, B, H, C, V)), jnp.float32)
    z = _zones(N, B, C, rng)
    kk, vv = (chunked._from_chunks(k), chunked._from_chunks(v)) if time_major else (k, v)
    got = wy.wy_adjoint(kk, vv, G, beta, jnp.asarray(T, dtype), h, dVn, jnp.asarray((z == 0).astype(np.float32)),
                        jnp.asarray(z), interpret=interpret)
    f64 = lambda x: jnp.asarray(np.asarray(jnp.asarray(x, jnp.float32), np.float64))
    zones = chunked._Zones(jnp.asarray(z.astype(np.int32))[:, :, None, :])
    want = chunked.ScanPasses().wy_adjoint(f64(dVn), f64(h), f64(jnp.asarray(T, dtype)), k, v, f64(k), f64(v),
                                           f64(beta), f64(G), zones)
    # bf16 operands (dVn, h, T, Kb, βv) and intermediates (dW, dT, Tᵀ·dT), each rounded by ≤ 2^-9: a chain
    # of at most eight roundings, ~3e-3 relative RMSE (1.7e-3–3.2e-3 seen); a wrong product or mask gives O(1)
    _compare(("dv", "dbeta", "dk", "dG", "dL"), got, want, jnp.float32, 6e-3)


@pytest.mark.parametrize("time_major", [False, True], ids=["chunk-major", "time-major"])
def test_interpret_adjoint_matches_float64(time_major):
    _check_adjoint((3, 1, 2, 64, 64), 128, jnp.bfloat16, interpret=True, seed=8, time_major=time_major)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_interpret_matches_float64(dtype):
    _check((3, 1, 2, 64, 64), 128, dtype, interpret=True, seed=7)


def test_rejects_wrong_operands():
    x = jnp.zeros((1, 1, 1, 64, 64), jnp.bfloat16)
    f = jnp.zeros((1, 1, 1, 64, 64), jnp.float32)
    r = jnp.ones((1, 1, 64), jnp.float32)
    with pytest.raises(ValueError, match=r"T must be float32\[1, 1, 1, 64, 64\], got bfloat16"):
        wy.forward_factors(x, x, x, f, f[..., 0], x, r, r, scale=1.0, interpret=True)
    with pytest.raises(ValueError, match=r"v must be bfloat16\[1, 1, 1, 64, 64\], got float32"):
        wy.forward_factors(x, x, f, f, f[..., 0], f, r, r, scale=1.0, interpret=True)


def test_adjoint_rejects_wrong_operands():
    x = jnp.zeros((1, 1, 1, 64, 64), jnp.bfloat16)
    f = jnp.zeros((1, 1, 1, 64, 64), jnp.float32)
    r = jnp.ones((1, 1, 64), jnp.float32)
    with pytest.raises(ValueError, match=r"wy_adjoint: v must be bfloat16\[1, 1, 1, 64, 64\], got float32"):
        wy.wy_adjoint(x, f, f, f[..., 0], x, x, f, r, r, interpret=True)
    with pytest.raises(ValueError, match=r"wy_adjoint: zone must be float32\[1, 1, 64\], got float32\[1, 1, 32\]"):
        wy.wy_adjoint(x, x, f, f[..., 0], x, x, f, r, r[..., :32], interpret=True)
    with pytest.raises(ValueError, match=r"wy_adjoint needs C = 64"):
        y = jnp.zeros((1, 1, 1, 32, 64), jnp.bfloat16)
        wy.wy_adjoint(y, y, y.astype(jnp.float32), f[..., :32, 0], y[..., :32], x, y, r[..., :32], r[..., :32],
                      interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("K,V", [(64, 64), (128, 128)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_gpu_matches_float64(dtype, K, V):
    assert jax.default_backend() == "gpu"
    _check((3, 2, 4, 64, K), V, dtype, interpret=False, seed=9)


@pytest.mark.gpu
@pytest.mark.parametrize("K,V", [(64, 64), (128, 128), (64, 128)])
def test_gpu_adjoint_matches_float64(K, V):
    assert jax.default_backend() == "gpu"
    _check_adjoint((3, 2, 4, 64, K), V, jnp.bfloat16, interpret=False, seed=10, time_major=K == V == 128)
