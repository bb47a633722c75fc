"""``kda_jax.kernels.adjoint.diagonal_adjoint`` (the diagonal sub-blocks' adjoints, bounded rows on the
tensor cores) through ``MosaicPasses.intra_diag_adjoint`` against the float64 sums of ``ScanPasses``.

CPU: interpret mode. GPU (``-m gpu``, ``KDA_TEST_GPU=1``): compiled. End-to-end gradients through the
kernel: test_mosaic.py (``factored_adjoint=True``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kda_jax.kernels import adjoint, blocks
from kda_jax.kernels.kda import MosaicPasses
from kda_jax.ops.chunked import SCAN, _Gating
from tests.kernels.test_blocks_kernel import _bounded_rows
from tests.kernels.test_intra_kernel import _inputs

SUB = blocks.SUB


def _check(shape, dtype, interpret, seed, bounded_only):
    N, B, H, C, K = shape
    q, k, G, rng = _inputs(*shape, dtype, seed)
    if bounded_only:
        G = jnp.asarray(np.cumsum(-np.logaddexp(0.0, 2.0 * rng.standard_normal(G.shape)), -2), jnp.float32)
    beta = jnp.asarray(rng.uniform(0.05, 1.0, (N, B, H, C)), jnp.float32)
    dMs = jnp.asarray(np.tril(rng.standard_normal((2, N, B, H, C, C))), jnp.float32)
    bounded = _bounded_rows(G)  # [N, B, H, C, 1]
    assert bounded.all() if bounded_only else (bounded.any() and not bounded.all())
    got_rows, got_col = MosaicPasses(interpret=interpret, factored_adjoint=True).intra_diag_adjoint(
        _Gating(G), q, k, beta, dMs)
    f64 = lambda x: jnp.asarray(np.asarray(jnp.asarray(x, jnp.float32), np.float64))  # x64: tests/conftest.py
    want_rows, want_col = SCAN.intra_diag_adjoint(_Gating(f64(G)), f64(q), f64(k), f64(beta), f64(dMs))
    want_rows, want_col = np.asarray(want_rows), np.asarray(want_col)
    cases = (("row_L", got_rows[0], want_rows[0], ~bounded), ("row_P", got_rows[1], want_rows[1], ~bounded),
             ("col", got_col, want_col, np.zeros_like(bounded)))
    for name, got, want, exact in cases:
        got = np.asarray(got, np.float64)
        assert np.isfinite(got).all(), name
        top = np.abs(want).max()
        # rows with unbounded gates: the exact band sums (float32)
        assert np.abs(np.where(exact, got - want, 0)).max() < 2e-6 * top, f"{name}: unbounded rows"
        # bounded rows (and the column sums they reach): bf16 operands, float32 accumulation
        err = np.where(exact, 0, got - want)
        assert np.abs(err).max() < 1e-2 * top, f"{name}: max error {np.abs(err).max():.2e} of {top:.2e}"
        rel = np.sqrt(np.sum(err ** 2) / np.sum(np.where(exact, 0, want) ** 2))
        assert rel < 4e-3, f"{name}: relative RMSE {rel:.2e}"


@pytest.mark.parametrize("bounded_only", [False, True], ids=["mixed-rows", "bounded-chunks"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_interpret_matches_float64(dtype, bounded_only):
    _check((2, 1, 2, 64, 64), dtype, interpret=True, seed=8, bounded_only=bounded_only)


def test_time_major_operands_equal_chunk_major():
    """q, k in the caller's layout ``[B, N·C, H, K]`` (``TIME_MAJOR``) give the same bits as chunk-major
    ones, in ``diagonal_adjoint`` and ``intra.band_adjoint``."""
    from kda_jax.kernels import intra
    from kda_jax.ops.chunked import _from_chunks

    N, B, H, C, K = 2, 2, 2, 64, 64
    q, k, G, rng = _inputs(N, B, H, C, K, jnp.bfloat16, 12)
    bands = [jnp.asarray(rng.standard_normal((N, B, H, 2, SUB, C)), jnp.float32) for _ in range(2)]
    dL, dP = (jnp.asarray(np.tril(rng.standard_normal((N, B, H, C, C))), jnp.float32) for _ in range(2))
    beta = jnp.asarray(rng.uniform(0.05, 1.0, (N, B, H, C)), jnp.float32)
    rows, ok = blocks.bounded_rows(G)
    for fn in (lambda q, k: adjoint.diagonal_adjoint(q, k, G, *bands, dL, dP, beta, rows, ok, interpret=True),
               lambda q, k: intra.band_adjoint(q, k, G, *bands, interpret=True)):
        for a, b in zip(fn(q, k), fn(_from_chunks(q), _from_chunks(k))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rejects_wrong_operands():
    q = jnp.zeros((1, 1, 1, 64, 64), jnp.bfloat16)
    G = q.astype(jnp.float32)
    bands = jnp.zeros((1, 1, 1, 2, SUB, 64), jnp.float32)
    dM, rows = jnp.zeros((1, 1, 1, 64, 64), jnp.float32), jnp.ones((1, 1, 1, 64), jnp.float32)
    ok = jnp.zeros((1, 1, 1), jnp.int32)
    call = lambda *a: adjoint.diagonal_adjoint(q, q, G, bands, bands, *a, interpret=True)
    with pytest.raises(ValueError, match=r"dP must be float32\[1, 1, 1, 64, 64\], got bfloat16"):
        call(dM, dM.astype(jnp.bfloat16), rows, rows, ok)
    with pytest.raises(ValueError, match=r"safe_rows must be float32\[1, 1, 1, 64\]"):
        call(dM, dM, rows, rows[..., :32], ok)
    with pytest.raises(ValueError, match=r"bounded must be int32\[1, 1, 1\]"):
        call(dM, dM, rows, rows, ok[..., None])


@pytest.mark.gpu
@pytest.mark.parametrize("bounded_only", [False, True], ids=["mixed-rows", "bounded-chunks"])
@pytest.mark.parametrize("K", [64, 128])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_gpu_matches_float64(dtype, K, bounded_only):
    assert jax.default_backend() == "gpu"
    _check((3, 2, 4, 64, K), dtype, interpret=False, seed=9, bounded_only=bounded_only)
