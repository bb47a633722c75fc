"""``kda_jax.kernels.blocks.gated_blocks`` (Aqk and L whole, one kernel) against float64 sums.

CPU: interpret mode at small shapes. GPU (``-m gpu``, ``KDA_TEST_GPU=1``): compiled, K = 64 and 128.
End-to-end outputs and gradients through the kernel: test_mosaic.py (``blocks_kernel=True``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kda_jax.kernels import blocks
from tests.kernels.test_intra_kernel import _inputs

SUB = blocks.SUB


def _zones(N, B, C, rng):
    """Document counts inside each chunk: chunk 0 has none, the others boundaries at random rows
    (some inside sub-chunks, one on a sub-chunk's first row)."""
    z = np.zeros((N, B, C), np.float32)
    for n in range(1, N):
        for b in range(B):
            for start in sorted({int(x) for x in rng.integers(1, C, 2)} | {16}):
                z[n, b, start:] += 1
    return z


def _reference(q, k, G, beta, zone, scale):
    q, k, G, beta = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, G, beta))
    C = q.shape[-2]
    i, j = np.arange(C)[:, None], np.arange(C)[None, :]
    e = np.exp(np.where((j <= i)[..., None], G[..., :, None, :] - G[..., None, :, :], -np.inf))  # [.., i, j, d]
    P = np.einsum("...id,...jd,...ijd->...ij", q, k, e)
    R = np.einsum("...id,...jd,...ijd->...ij", k, k, e)
    same = (zone[..., :, None] == zone[..., None, :])[:, :, None]  # [N, B, 1, C, C]
    return scale * np.where((j <= i) & same, P, 0.0), beta[..., None] * np.where((j < i) & same, R, 0.0)


def _bounded_rows(G):
    """[N, B, H, C, 1] bool: rows whose decay since their sub-chunk's first row is within SAFE_SPAN
    in every channel (float64, from the kernel's float32 G)."""
    G = np.asarray(G, np.float64)
    Gb = G.reshape(*G.shape[:-2], -1, SUB, G.shape[-1])
    span = (Gb[..., :1, :] - Gb).max(-1).reshape(G.shape[:-1])
    return (span <= blocks.SAFE_SPAN)[..., None]


def _check(shape, dtype, interpret, seed, buffers=None, block_d=None, factored=False, bounded_only=False):
    """``factored``: rows with bounded gates take tensor-core values at every distance (bf16
    operands), the others the exact bands; ``bounded_only``: no −1000 gates (every chunk skips the bands)."""
    N, B, H, C, K = shape
    q, k, G, rng = _inputs(*shape, dtype, seed)
    if bounded_only:
        G = jnp.asarray(np.cumsum(-np.logaddexp(0.0, 2.0 * rng.standard_normal(G.shape)), -2), jnp.float32)
    beta = jnp.asarray(rng.uniform(0.05, 1.0, (N, B, H, C)), jnp.float32)
    zone = _zones(N, B, C, rng)
    scale = K ** -0.5
    Aqk, L = blocks.gated_blocks(q, k, G, beta, jnp.asarray(zone), scale=scale, interpret=interpret, buffers=buffers,
                                 block_d=block_d, factored=factored)
    bounded = _bounded_rows(G) if factored else np.zeros((N, B, H, C, 1), bool)
    if bounded_only:
        assert bounded.all()
    elif factored:
        assert bounded.any() and not bounded.all()  # both kinds of rows in the same chunks
    # the exact bands (float32 sums): distances below 16 on unbounded rows
    diag = (np.arange(C)[:, None] - np.arange(C)[None, :] < SUB) & ~bounded
    for name, got, want in zip(("Aqk", "L"), (Aqk, L), _reference(q, k, G, beta, zone, scale)):
        got = np.asarray(got, np.float64)
        assert np.isfinite(got).all(), name
        strict = name == "L"
        keep = (np.arange(C)[:, None] - np.arange(C)[None, :] >= int(strict)) & (zone[..., :, None] == zone[..., None, :])[:, :, None]
        assert not np.broadcast_to(~keep, got.shape)[got != 0].any(), f"{name}: entries outside the causal same-document pairs"
        top = np.abs(want).max()
        assert np.abs(np.where(diag, got - want, 0)).max() < 2e-6 * top, f"{name}: distances below {SUB}"
        # the rest: bf16 operands (each rounded by ≤ 2^-9), float32 accumulation
        off = ~diag & (np.arange(C)[:, None] >= np.arange(C)[None, :] + int(strict))
        err = np.where(off, got - want, 0)
        assert np.abs(err).max() < 1e-2 * top, f"{name}: off-diagonal max error {np.abs(err).max():.2e} of {top:.2e}"
        rel = np.sqrt(np.sum(err ** 2) / np.sum(np.where(off, want, 0) ** 2))
        assert rel < 4e-3, f"{name}: off-diagonal relative RMSE {rel:.2e}"


@pytest.mark.parametrize("dtype,buffers,block_d", [(jnp.bfloat16, 1, 64), (jnp.bfloat16, 2, 32), (jnp.float32, None, None)],
                         ids=["bf16-1-64", "bf16-2-32", "f32"])
def test_interpret_matches_float64(dtype, buffers, block_d):
    _check((3, 1, 2, 64, 128), dtype, interpret=True, seed=3, buffers=buffers, block_d=block_d)


def test_time_major_operands_equal_chunk_major():
    """q, k in the caller's layout ``[B, N·C, H, K]`` (``TIME_MAJOR``) give the same bits as chunk-major ones."""
    from kda_jax.kernels import intra
    from kda_jax.ops.chunked import _from_chunks

    N, B, H, C, K = 2, 2, 2, 64, 64
    q, k, G, rng = _inputs(N, B, H, C, K, jnp.bfloat16, 11)
    beta = jnp.asarray(rng.uniform(0.05, 1.0, (N, B, H, C)), jnp.float32)
    zone = jnp.asarray(_zones(N, B, C, rng))
    for fn in (lambda q, k: blocks.gated_blocks(q, k, G, beta, zone, scale=0.125, interpret=True, factored=True),
               lambda q, k: (intra.band_lower(q, k, G, interpret=True),)):
        for a, b in zip(fn(q, k), fn(_from_chunks(q), _from_chunks(k))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("bounded_only", [False, True], ids=["mixed-rows", "bounded-chunks"])
def test_interpret_factored_diagonal(bounded_only):
    _check((3, 1, 2, 64, 128), jnp.bfloat16, interpret=True, seed=4, factored=True, bounded_only=bounded_only)


def test_factored_diagonal_is_causal():
    """An entry's value does not depend on later rows, bit for bit: changing the gates of the rows
    after t (to unbounded ones, which moves the chunk off the band-free path) leaves rows ≤ t alone."""
    N, B, H, C, K = 2, 1, 2, 64, 128
    q, k, G, rng = _inputs(N, B, H, C, K, jnp.bfloat16, 6)
    a = np.diff(np.asarray(G), axis=-2, prepend=0.0)
    a = np.where(a < -100, -0.5, a)  # bounded everywhere
    beta = jnp.asarray(rng.uniform(0.05, 1.0, (N, B, H, C)), jnp.float32)
    zone = jnp.zeros((N, B, C), jnp.float32)
    t = 37
    b2 = a.copy()
    b2[..., t + 1:, :] = np.where(rng.uniform(size=b2[..., t + 1:, :].shape) < 0.1, -1000.0, -2.0)
    outs = []
    for gates in (a, b2):
        Gx = jnp.asarray(np.cumsum(gates, -2), jnp.float32)
        outs.append([np.asarray(x) for x in blocks.gated_blocks(q, k, Gx, beta, zone, scale=0.1, interpret=True,
                                                                 factored=True)])
    assert np.asarray(blocks.bounded_rows(jnp.asarray(np.cumsum(a, -2), jnp.float32))[1]).all()
    assert not np.asarray(blocks.bounded_rows(jnp.asarray(np.cumsum(b2, -2), jnp.float32))[1]).all()
    for x, y in zip(*outs):
        np.testing.assert_array_equal(x[..., : t + 1, :], y[..., : t + 1, :])


def _check_inverse(shape, interpret, seed):
    """``inverse``: T = (I + L)⁻¹ against float64 ``np.linalg.inv`` of the kernel's own L, Aqk unchanged
    bit for bit, for random keys with −1000 gates and documents, and for identical unit keys with
    β = 1 and no decay (L ≈ all ones below the diagonal in each document: the most cancellation for
    substitution; T ≈ 1 on the diagonal and −1 just below it)."""
    N, B, H, C, K = shape
    q, k, G, rng = _inputs(N, B, H, C, K, jnp.bfloat16, seed)
    beta = jnp.asarray(rng.uniform(0.05, 1.0, (N, B, H, C)), jnp.float32)
    zone = jnp.asarray(_zones(N, B, C, rng))
    ones = jnp.asarray(np.broadcast_to(np.eye(K)[0], (N, B, H, C, K)), jnp.bfloat16)
    run = lambda *a, **kw: blocks.gated_blocks(*a, zone, scale=0.125, interpret=interpret, factored=True, **kw)
    for case, args in (("random", (q, k, G, beta)), ("identical", (ones, ones, jnp.zeros_like(G), jnp.ones_like(beta)))):
        Aqk, L = run(*args)
        want = np.linalg.inv(np.eye(C) + np.asarray(L, np.float64))
        for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2.0 ** -8)):
            A2, T = run(*args, inverse=dtype)
            assert T.dtype == dtype
            np.testing.assert_array_equal(np.asarray(A2), np.asarray(Aqk))
            err = np.abs(np.asarray(T, np.float64) - want)
            assert (err <= tol * np.maximum(np.abs(want), 1.0)).all(), f"{case} {dtype}: max error {err.max():.2e}"
    z = np.asarray(zone)[:, :, None]
    i, j = np.arange(C)[:, None], np.arange(C)[None, :]
    bidiagonal = np.where(i == j, 1.0, np.where((i == j + 1) & (z[..., :, None] == z[..., None, :]), -1.0, 0.0))
    np.testing.assert_allclose(want, np.broadcast_to(bidiagonal, want.shape), atol=1e-2)


def test_interpret_inverse():
    _check_inverse((2, 1, 2, 64, 64), interpret=True, seed=15)


def test_rejects_wrong_operands():
    q = jnp.zeros((1, 1, 1, 64, 64), jnp.bfloat16)
    G = q.astype(jnp.float32)
    with pytest.raises(ValueError, match=r"beta must be float32\[1, 1, 1, 64\], got bfloat16"):
        blocks.gated_blocks(q, q, G, jnp.zeros((1, 1, 1, 64), jnp.bfloat16), jnp.zeros((1, 1, 64), jnp.float32), scale=1.0,
                            interpret=True)
    with pytest.raises(ValueError, match=r"zone must be float32\[1, 1, 64\]"):
        blocks.gated_blocks(q, q, G, G[..., 0], jnp.zeros((1, 1, 64), jnp.int32), scale=1.0, interpret=True)
    q96 = jnp.zeros((1, 1, 1, 64, 96), jnp.bfloat16)
    with pytest.raises(ValueError, match="K a multiple of 64"):
        blocks.gated_blocks(q96, q96, q96.astype(jnp.float32), G[..., 0], jnp.zeros((1, 1, 64), jnp.float32), scale=1.0,
                            interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("buffers,block_d", [(1, 64), (2, 64), (2, 32)])
@pytest.mark.parametrize("K", [64, 128])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_gpu_matches_float64(dtype, K, buffers, block_d):
    assert jax.default_backend() == "gpu"
    _check((3, 2, 4, 64, K), dtype, interpret=False, seed=5, buffers=buffers, block_d=block_d)


@pytest.mark.gpu
@pytest.mark.parametrize("buffers,block_d", [(None, None), (1, 64)], ids=["defaults", "1-64"])
@pytest.mark.parametrize("bounded_only", [False, True], ids=["mixed-rows", "bounded-chunks"])
@pytest.mark.parametrize("K", [64, 128])
def test_gpu_factored_diagonal(K, bounded_only, buffers, block_d):
    assert jax.default_backend() == "gpu"
    _check((3, 2, 4, 64, K), jnp.bfloat16, interpret=False, seed=7, buffers=buffers, block_d=block_d, factored=True,
           bounded_only=bounded_only)


@pytest.mark.gpu
@pytest.mark.parametrize("K", [64, 128])
def test_gpu_inverse(K):
    """T in the kernel's epilogue (``INVERSE_IN_BLOCKS``), compiled."""
    assert jax.default_backend() == "gpu"
    _check_inverse((3, 2, 4, 64, K), interpret=False, seed=16)
