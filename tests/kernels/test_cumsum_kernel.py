"""``kda_jax.kernels.cumsum`` (the gate's in-chunk cumsum and its adjoint) against float64 sums.

CPU: interpret mode. GPU (``-m gpu``, ``KDA_TEST_GPU=1``): compiled. End-to-end through the op:
test_mosaic.py (``cumsum_kernel=True``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kda_jax.kernels import cumsum
from kda_jax.ops.chunked import SCAN


def _gates(B, T, H, K, seed):
    """Log decays of Kimi Linear's range (−softplus of a wide normal) with a few −1000 entries."""
    rng = np.random.default_rng(seed)
    a = -np.logaddexp(0.0, 3.0 * rng.standard_normal((B, T, H, K)))
    a[rng.random(a.shape) < 0.01] = -1000.0
    return a.astype(np.float32), rng


def _forward_want(a, C):
    B, T, H, K = a.shape
    return np.cumsum(a.astype(np.float64).reshape(B, T // C, C, H, K), axis=2).transpose(1, 0, 3, 2, 4)


def _adjoint_want(dG):
    N, B, H, C, K = dG.shape
    suffix = np.flip(np.cumsum(np.flip(dG.astype(np.float64), 3), 3), 3)
    return suffix.transpose(1, 0, 3, 2, 4).reshape(B, N * C, H, K)


def _within_rounding(got, want, scale, name):
    """float32 tree sums of ≤ C terms: each entry within (log₂ C + 1)·ε of the sum of magnitudes."""
    got = np.asarray(got, np.float64)
    assert np.isfinite(got).all(), name
    bound = 8 * np.finfo(np.float32).eps * scale
    assert (np.abs(got - want) <= bound).all(), f"{name}: max error {np.abs(got - want).max():.3e}"


def _check(B, T, H, K, C, interpret, seed):
    a, rng = _gates(B, T, H, K, seed)
    G = cumsum.chunk_cumsum(jnp.asarray(a), chunk_size=C, interpret=interpret)
    assert G.shape == (T // C, B, H, C, K) and G.dtype == jnp.float32
    _within_rounding(G, _forward_want(a, C), _forward_want(np.abs(a), C), "G")
    dG = rng.standard_normal(G.shape).astype(np.float32)
    da = cumsum.chunk_cumsum_adjoint(jnp.asarray(dG), interpret=interpret)
    assert da.shape == a.shape and da.dtype == jnp.float32
    _within_rounding(da, _adjoint_want(dG), _adjoint_want(np.abs(dG)), "da")
    # the custom VJP is the adjoint of the forward: against XLA's transpose of the scan passes' GEMM
    _, vjp = jax.vjp(lambda x: cumsum.gate_cumsum(x, C, interpret), jnp.asarray(a))
    _, vjp_ref = jax.vjp(lambda x: SCAN.gate_cumsum(x, C), jnp.asarray(a, jnp.float64))
    (got,), (want,) = vjp(jnp.asarray(dG)), vjp_ref(jnp.asarray(dG, jnp.float64))
    _within_rounding(got, np.asarray(want), _adjoint_want(np.abs(dG)), "vjp")


@pytest.mark.parametrize("B,T,H,K", [(2, 192, 3, 96), (1, 64, 1, 32)], ids=["3-chunks-K96", "one-chunk-K32"])
def test_interpret_matches_float64(B, T, H, K):
    _check(B, T, H, K, 64, interpret=True, seed=B + T + H + K)


def _check_floor(B, T, H, K, interpret, seed):
    """``floor``: the forward sums max(a, floor) and the VJP is ``jnp.maximum``'s (1 above the floor,
    ½ on it, 0 below: −1000, −inf), against XLA's max and cumsum in float64."""
    C, floor = 64, -200.0
    a, rng = _gates(B, T, H, K, seed)
    a[0, 3, 0, :4] = -np.inf
    a[0, 70, 1, 5:9] = floor  # ties
    G, vjp = jax.vjp(lambda x: cumsum.gate_cumsum(x, C, interpret, floor), jnp.asarray(a))
    ref = lambda x: SCAN.gate_cumsum(jnp.maximum(x, floor), C)
    want, vjp_ref = jax.vjp(ref, jnp.asarray(a, jnp.float64))
    _within_rounding(G, np.asarray(want), _forward_want(np.abs(np.maximum(a, floor)), C), "G")
    dG = rng.standard_normal(G.shape).astype(np.float32)
    (got,), (want,) = vjp(jnp.asarray(dG)), vjp_ref(jnp.asarray(dG, jnp.float64))
    _within_rounding(got, np.asarray(want), _adjoint_want(np.abs(dG)), "vjp")
    got = np.asarray(got)
    assert (got[a < floor] == 0).all() and np.isfinite(got).all()
    tie = np.asarray(cumsum.chunk_cumsum_adjoint(jnp.asarray(dG), interpret=interpret))[0, 70, 1, 5:9]
    np.testing.assert_array_equal(got[0, 70, 1, 5:9], 0.5 * tie)
    with pytest.raises(ValueError, match="a floor needs the forward's input a"):
        cumsum.chunk_cumsum_adjoint(jnp.asarray(dG), floor=floor, interpret=interpret)


def test_interpret_gate_floor():
    _check_floor(1, 128, 2, 32, interpret=True, seed=13)


def test_interpret_is_causal():
    """Changing token t changes no G row before it and no da row after it (bit for bit)."""
    a, rng = _gates(1, 128, 2, 32, 3)
    t = 77
    b = a.copy()
    b[:, t] += 5.0
    Ga, Gb = (np.asarray(cumsum.chunk_cumsum(jnp.asarray(x), chunk_size=64, interpret=True)) for x in (a, b))
    n, i = divmod(t, 64)
    assert np.array_equal(Ga[:n], Gb[:n]) and np.array_equal(Ga[n, ..., :i, :], Gb[n, ..., :i, :])
    assert not np.array_equal(Ga[n, ..., i, :], Gb[n, ..., i, :])
    dG = rng.standard_normal(Ga.shape).astype(np.float32)
    dH = dG.copy()
    dH[n, ..., i, :] += 5.0
    da, dh = (np.asarray(cumsum.chunk_cumsum_adjoint(jnp.asarray(x), interpret=True)) for x in (dG, dH))
    assert np.array_equal(da[:, t + 1:], dh[:, t + 1:]) and not np.array_equal(da[:, t], dh[:, t])


def test_rejects_wrong_operands():
    with pytest.raises(ValueError, match=r"T=100 is not a multiple of the chunk size 64"):
        cumsum.chunk_cumsum(jnp.zeros((1, 100, 1, 32), jnp.float32), chunk_size=64, interpret=True)
    with pytest.raises(ValueError, match=r"a must be float32\[1, 64, 1, 32\], got bfloat16"):
        cumsum.chunk_cumsum(jnp.zeros((1, 64, 1, 32), jnp.bfloat16), chunk_size=64, interpret=True)
    with pytest.raises(ValueError, match=r"needs C a multiple of 64 and K of 32; got C=64 K=48"):
        cumsum.chunk_cumsum_adjoint(jnp.zeros((1, 1, 1, 64, 48), jnp.float32), interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,H,K", [(2, 8192, 16, 128), (3, 1024, 5, 64)], ids=["mid", "K64"])
def test_gpu_matches_float64(B, T, H, K):
    assert jax.default_backend() == "gpu"
    _check(B, T, H, K, 64, interpret=False, seed=T + K)


@pytest.mark.gpu
def test_gpu_gate_floor():
    """The floor (``GATE_FLOOR_KERNEL``) compiled, at the mid benchmark's head size."""
    assert jax.default_backend() == "gpu"
    _check_floor(2, 2048, 4, 128, interpret=False, seed=14)
