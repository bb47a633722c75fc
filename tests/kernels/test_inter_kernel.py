"""``kda_jax.kernels.inter.inter_adjoint`` (the backward's parts through the chunk states in one
kernel) against the float64 XLA form (``kda_jax.ops.chunked.ScanPasses.inter_adjoint``). CPU:
interpret mode. GPU (``-m gpu``, ``KDA_TEST_GPU=1``): compiled. End-to-end outputs and gradients
through the kernel: test_mosaic.py (``inter_adjoint_kernel=True``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kda_jax.kernels import inter
from kda_jax.ops import chunked
from tests.kernels.test_blocks_kernel import _zones
from tests.kernels.test_intra_kernel import _inputs
from tests.kernels.test_wy_kernel import _compare


def _check(shape, V, interpret, seed, time_major=False):
    N, B, H, C, K = shape
    q, k, G, rng = _inputs(*shape, jnp.bfloat16, seed)
    z = _zones(N, B, C, rng)
    # the state's decay over each chunk (an operand of its own here: e^{G_end} of these gates is ~0)
    gend = np.where(z[:, :, None, -1:] == 0, rng.uniform(0.3, 1.0, (N, B, H, K)), 0.0).astype(np.float32)
    dO, Vn = (jnp.asarray(rng.standard_normal((N, B, H, C, V)), jnp.bfloat16) for _ in range(2))
    h = jnp.asarray(rng.standard_normal((N, B, H, K, V)), jnp.bfloat16)
    dSn = jnp.asarray(rng.standard_normal((N, B, H, K, V)), jnp.float32)
    masks = [jnp.asarray(m.astype(np.float32)) for m in (z == 0, z == z[..., -1:])]
    scale = K ** -0.5
    qq, kk = (chunked._from_chunks(q), chunked._from_chunks(k)) if time_major else (q, k)
    got = inter.inter_adjoint(qq, kk, G, jnp.asarray(gend), dO, h, Vn, dSn, *masks, jnp.asarray(z), scale=scale,
                              interpret=interpret)
    f64 = lambda x: jnp.asarray(np.asarray(jnp.asarray(x, jnp.float32), np.float64))
    zones = chunked._Zones(jnp.asarray(z.astype(np.int32))[:, :, None, :])
    want = chunked.ScanPasses().inter_adjoint(f64(dO), f64(h), f64(Vn), f64(dSn), q, k, f64(q), f64(k), f64(G),
                                              f64(gend), zones, scale)
    # dq and dP multiply bf16 inputs exactly (float32 accumulation); dk and dG read dSn rounded to bf16
    # (≤ 2^-9 each, ~1e-3 relative RMSE), as the XLA GEMMs on bf16 operands do
    _compare(("dq", "dP"), got[::3], want[::3], jnp.float32, 1e-5)
    _compare(("dk", "dG"), got[1:3], want[1:3], jnp.float32, 4e-3)
    last = np.asarray(got[2])[..., -1, :] - np.asarray(want[2])[..., -1, :]
    assert np.abs(last).max() <= 4e-3 * np.abs(np.asarray(want[2])[..., -1, :]).max(), "dG's last rows (the state's part)"


@pytest.mark.parametrize("time_major", [False, True], ids=["chunk-major", "time-major"])
def test_interpret_matches_float64(time_major):
    _check((3, 1, 2, 64, 64), 128, interpret=True, seed=11, time_major=time_major)


def test_rejects_wrong_operands():
    x = jnp.zeros((1, 1, 1, 64, 64), jnp.bfloat16)
    f = jnp.zeros((1, 1, 1, 64, 64), jnp.float32)
    r = jnp.ones((1, 1, 64), jnp.float32)
    with pytest.raises(ValueError, match=r"inter_adjoint: q must be bfloat16\[1, 1, 1, 64, 64\], got float32"):
        inter.inter_adjoint(f, x, f, f[..., 0, :], x, x, x, f, r, r, r, scale=1.0, interpret=True)
    with pytest.raises(ValueError, match=r"inter_adjoint: gend must be float32\[1, 1, 1, 64\], got float32\[1, 1, 1\]"):
        inter.inter_adjoint(x, x, f, f[..., 0, 0], x, x, x, f, r, r, r, scale=1.0, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("K,V", [(64, 64), (128, 128), (64, 128)])
def test_gpu_matches_float64(K, V):
    assert jax.default_backend() == "gpu"
    _check((3, 2, 4, 64, K), V, interpret=False, seed=12, time_major=K == V == 128)
