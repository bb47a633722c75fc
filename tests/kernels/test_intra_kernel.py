"""The diagonal-block kernels of ``kda_jax.kernels.intra`` against float64 sums, and the band/block
conversions of ``kda_jax.kernels.kda``. CPU: interpret mode at small shapes. GPU (``-m gpu``,
``KDA_TEST_GPU=1``): compiled, K = 128. End-to-end outputs and gradients through these kernels are
covered by test_mosaic.py (``INTRA_KERNEL``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kda_jax.kernels import intra
from kda_jax.kernels.kda import bands_to_blocks, blocks_to_col_bands, blocks_to_row_bands

SUB = intra.SUB


def _inputs(N, B, H, C, K, dtype, seed):
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q = jnp.asarray(unit(rng.standard_normal((N, B, H, C, K))), dtype)
    k = jnp.asarray(unit(rng.standard_normal((N, B, H, C, K))), dtype)
    a = -np.logaddexp(0.0, rng.standard_normal((N, B, H, C, K)))
    a[..., 5, :3] = -1000.0  # unbounded gate: whole channels cut inside a sub-chunk
    a[..., 40, :] = -1000.0
    G = jnp.asarray(np.cumsum(a, -2), jnp.float32)
    return q, k, G, rng


def _valid(C, col=False):
    """[SUB, C]: the (δ, row) entries whose pair lies inside one 16-row sub-chunk."""
    d, i = np.arange(SUB)[:, None], np.arange(C)[None, :]
    return (i % SUB + d < SUB) if col else (i % SUB >= d)


def _f64(*xs):
    return [np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in xs]


def _ref_lower(q, k, G):
    q, k, G = _f64(q, k, G)
    C = k.shape[-2]
    out = np.zeros((*k.shape[:3], 2, SUB, C))
    for d in range(SUB):
        for i in range(d, C):
            e = np.exp(G[..., i, :] - G[..., i - d, :])
            out[..., 0, d, i] = np.sum(q[..., i, :] * k[..., i - d, :] * e, -1)
            out[..., 1, d, i] = np.sum(k[..., i, :] * k[..., i - d, :] * e, -1)
    return out * _valid(C)


def _ref_adjoint(q, k, G, rows, cols):
    q, k, G, rows, cols = _f64(q, k, G, rows, cols)
    C = k.shape[-2]
    rl, rp, col = (np.zeros_like(k) for _ in range(3))
    for d in range(SUB):
        for i in range(C):
            if i >= d:
                e = np.exp(G[..., i, :] - G[..., i - d, :])
                rl[..., i, :] += rows[..., 0, d, i, None] * k[..., i - d, :] * e
                rp[..., i, :] += rows[..., 1, d, i, None] * k[..., i - d, :] * e
            if i + d < C:
                e = np.exp(G[..., i + d, :] - G[..., i, :])
                col[..., i, :] += (cols[..., 0, d, i, None] * k[..., i + d, :] + cols[..., 1, d, i, None] * q[..., i + d, :]) * e
    return rl, rp, col


def _check_kernels(shape, dtype, interpret, seed):
    q, k, G, rng = _inputs(*shape, dtype, seed)
    C = shape[3]
    band = np.asarray(intra.band_lower(q, k, G, interpret=interpret))
    want = _ref_lower(q, k, G)
    scale = np.abs(want).max()
    assert np.isfinite(band).all()
    assert np.abs(band * _valid(C) - want).max() < 2e-6 * scale
    rows = jnp.asarray(rng.standard_normal((*shape[:3], 2, SUB, C)) * _valid(C), jnp.float32)
    cols = jnp.asarray(rng.standard_normal((*shape[:3], 2, SUB, C)) * _valid(C, col=True), jnp.float32)
    got = intra.band_adjoint(q, k, G, rows, cols, interpret=interpret)
    for name, a, b in zip(("row_L", "row_P", "col"), got, _ref_adjoint(q, k, G, rows, cols)):
        assert np.isfinite(np.asarray(a)).all(), name
        assert np.abs(np.asarray(a, np.float64) - b).max() < 2e-6 * np.abs(b).max(), name


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_interpret_matches_float64(dtype):
    _check_kernels((2, 1, 2, 64, 64), dtype, interpret=True, seed=1)


def test_band_block_conversions():
    rng = np.random.default_rng(0)
    M = np.tril(rng.standard_normal((2, 3, 1, 2, 4, SUB, SUB)))  # [S, N, B, H, nc, 16, 16]
    rows = np.asarray(blocks_to_row_bands(jnp.asarray(M)))  # [N, B, H, S, 16, C]
    cols = np.asarray(blocks_to_col_bands(jnp.asarray(M)))
    for p in range(4):
        for r in range(SUB):
            for c in range(r + 1):
                i, j = SUB * p + r, SUB * p + c
                assert rows[1, 0, 1, 0, r - c, i] == M[0, 1, 0, 1, p, r, c]
                assert cols[1, 0, 1, 0, r - c, j] == M[0, 1, 0, 1, p, r, c]
    assert not rows[..., ~_valid(64)].any() and not cols[..., ~_valid(64, col=True)].any()
    np.testing.assert_array_equal(np.asarray(bands_to_blocks(jnp.asarray(rows))), M)


def test_rejects_wrong_operands():
    q = jnp.zeros((1, 1, 1, 64, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"G must be float32\[1, 1, 1, 64, 64\], got bfloat16"):
        intra.band_lower(q, q, q, interpret=True)
    with pytest.raises(ValueError, match="C a multiple of 64"):
        intra.band_lower(q[..., :48, :], q[..., :48, :], q[..., :48, :].astype(jnp.float32), interpret=True)
    # q, k in the caller's layout [B, N·C, H, K] go together, and with a chunk-major G
    G, qt = q.astype(jnp.float32), jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"q must be bfloat16\[1, 64, 1, 64\], got bfloat16\[1, 1, 1, 64, 64\]"):
        intra.band_lower(q, qt, G, interpret=True)
    with pytest.raises(ValueError, match=r"G must be chunk-major \[N, B, H, C, K\]"):
        intra.band_lower(qt, qt, qt.astype(jnp.float32), interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_gpu_matches_float64(dtype):
    assert jax.default_backend() == "gpu"
    _check_kernels((3, 2, 4, 64, 128), dtype, interpret=False, seed=2)
