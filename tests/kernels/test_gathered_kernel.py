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


def _inputs(M, E, D, F, n_w=1, seed=0):
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.standard_normal((M, D)), jnp.bfloat16)
    ws = tuple(jnp.asarray(rng.standard_normal((E, D, F)) * D**-0.5, jnp.bfloat16) for _ in range(n_w))
    idx = rng.integers(0, E, M)
    idx[: min(M, 3)] = idx[0]  # the same expert in several rows (the gradient accumulates)
    return a, jnp.asarray(idx, jnp.int32), ws


def _oracle(a, idx, ws, g):
    a64, g64 = np.asarray(a, np.float64), np.asarray(g, np.float64)
    w64 = [np.asarray(w, np.float64)[np.asarray(idx)] for w in ws]
    out = np.stack([np.einsum("md,mdf->mf", a64, w) for w in w64])
    da = sum(np.einsum("mf,mdf->md", g64[j], w) for j, w in enumerate(w64))
    dws = []
    for j, w in enumerate(ws):
        dw = np.zeros(w.shape)
        np.add.at(dw, np.asarray(idx), np.einsum("md,mf->mdf", a64, g64[j]))
        dws.append(dw)
    return out, da, dws


def _check(M, E, D, F, n_w, seed, interpret):
    a, idx, ws = _inputs(M, E, D, F, n_w, seed)
    g = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((n_w, M, F)), jnp.float32)
    out, vjp = jax.vjp(lambda a, ws: expert_rows(a, idx, ws, interpret), a, ws)
    da, dws = vjp(g)
    out_ref, da_ref, dws_ref = _oracle(a, idx, ws, g)
    assert out.dtype == jnp.float32 and out.shape == (n_w, M, F)
    assert_close("out", out, out_ref, 1e-5)  # bf16 products, float32 accumulation
    assert_close("da", da, da_ref, 8e-3)  # cast to bf16 (the input's dtype)
    for j, (dw, dw_ref) in enumerate(zip(dws, dws_ref)):
        assert_close(f"dw{j}", dw, dw_ref, 8e-3)


@pytest.mark.parametrize("M,E,D,F,n_w", [(1, 4, 128, 64, 2), (3, 5, 64, 192, 1), (70, 8, 64, 64, 2)],
                         ids=["one-row-two-weights", "three-rows", "two-row-blocks-two-weights"])
def test_interpret_matches_float64_products_and_gradients(M, E, D, F, n_w):
    _check(M, E, D, F, n_w, seed=M, interpret=True)


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
    with pytest.raises(ValueError, match="do not match"):
        a, idx, (w1, w2) = _inputs(2, 3, 64, 64, n_w=2)
        expert_rows(a, idx, (w1, w2[:, :, :32]), True)


@pytest.mark.gpu
@pytest.mark.parametrize("M,E,D,F,n_w", [(8, 64, 1216, 1024, 2), (8, 64, 1024, 1216, 1), (1, 64, 1216, 1024, 2),
                                         (64, 64, 1216, 1024, 2), (3, 7, 192, 320, 1), (70, 9, 192, 128, 2)])
def test_gpu_matches_float64_products_and_gradients(M, E, D, F, n_w):
    _check(M, E, D, F, n_w, seed=M + E, interpret=False)


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
