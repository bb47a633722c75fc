"""The gathered-expert kernel (decode-sized MoE products) against float64 products (interpret mode on
CPU; compiled with ``-m gpu``), its gradients, and the MoE layer's dispatch to it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kda_jax import kernels
from kda_jax.kernels import gathered_supports
from kda_jax.kernels.gathered import expert_rows
from kda_jax.layers import moe
from tests.ops.helpers import assert_close


def _inputs(M, E, D, F, seed=0):
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.standard_normal((M, D)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((E, D, F)) * D**-0.5, jnp.bfloat16)
    idx = rng.integers(0, E, M)
    idx[: min(M, 3)] = idx[0]  # the same expert in several rows (the gradient accumulates)
    return a, jnp.asarray(idx, jnp.int32), w


def _oracle(a, idx, w, g):
    a64, w64, g64 = (np.asarray(x, np.float64) for x in (a, w, g))
    idx = np.asarray(idx)
    out = np.einsum("md,mdf->mf", a64, w64[idx])
    da = np.einsum("mf,mdf->md", g64, w64[idx])
    dw = np.zeros_like(w64)
    np.add.at(dw, idx, np.einsum("md,mf->mdf", a64, g64))
    return out, da, dw


def _check(M, E, D, F, seed, interpret):
    a, idx, w = _inputs(M, E, D, F, seed)
    g = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((M, F)), jnp.float32)
    out, vjp = jax.vjp(lambda a, w: expert_rows(a, idx, w, interpret), a, w)
    da, dw = vjp(g)
    out_ref, da_ref, dw_ref = _oracle(a, idx, w, g)
    assert out.dtype == jnp.float32 and out.shape == (M, F)
    assert_close("out", out, out_ref, 1e-5)  # bf16 products, float32 accumulation
    assert_close("da", da, da_ref, 8e-3)  # cast to bf16 (the input's dtype)
    assert_close("dw", dw, dw_ref, 8e-3)


@pytest.mark.parametrize("M,E,D,F", [(1, 4, 128, 64), (3, 5, 64, 192), (70, 8, 64, 64)],
                         ids=["one-row", "three-rows", "two-row-blocks"])
def test_interpret_matches_float64_products_and_gradients(M, E, D, F):
    _check(M, E, D, F, seed=M, interpret=True)


def test_gathered_dispatch_is_fail_closed():
    bf = jnp.bfloat16
    assert gathered_supports(8, 1216, 1024, bf, bf, "gpu", 1) is None
    assert "GPU" in gathered_supports(8, 1216, 1024, bf, bf, "cpu", 1)
    assert "single-device" in gathered_supports(8, 1216, 1024, bf, bf, "gpu", 2)
    assert "bf16" in gathered_supports(8, 1216, 1024, jnp.float32, bf, "gpu", 1)
    assert "multiples of 64" in gathered_supports(8, 1200, 1024, bf, bf, "gpu", 1)
    assert "rows" in gathered_supports(300, 1216, 1024, bf, bf, "gpu", 1)
    with pytest.raises(ValueError, match="multiples of 64"):
        expert_rows(*_inputs(2, 3, 96, 64), True)


@pytest.mark.gpu
@pytest.mark.parametrize("M,E,D,F", [(8, 64, 1216, 1024), (8, 64, 1024, 1216), (1, 64, 1216, 1024),
                                     (64, 64, 1216, 1024), (3, 7, 192, 320)])
def test_gpu_matches_float64_products_and_gradients(M, E, D, F):
    _check(M, E, D, F, seed=M + E, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [1, 8])
def test_gpu_moe_layer_with_the_kernel_equals_the_dense_path(N, monkeypatch):
    """The 653M preset's MoE sizes, bf16, N tokens with N·K ≤ E (the gathered path) and the kernel on."""
    monkeypatch.setattr(kernels, "GATHERED_AUTO", True)
    layer = moe.MoE(1216, num_experts=64, top_k=8, expert_dim=1024, num_shared_experts=1, routed_scaling_factor=2.446,
                    rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(N).standard_normal((N, 1, 1216)), jnp.bfloat16)
    kernel_out = jax.jit(lambda x: layer(x)[0])(x)
    hlo = jax.jit(lambda x: layer(x)[0]).lower(x).as_text()
    assert "moe_gathered_matmul" in hlo
    layer.dispatch = "dense"
    dense_out = jax.jit(lambda x: layer(x)[0])(x)
    assert_close("moe", kernel_out, dense_out, 1e-2)
