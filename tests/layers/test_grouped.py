"""The block-aligned grouped matmul: layout invariants, and values and gradients against a
per-assignment float64 NumPy loop (empty groups, dropped assignments, several scan chunks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kda_jax.layers import grouped
from kda_jax.layers.grouped import aligned_layout, buffer_rows, grouped_matmul


def _groups(M, E, seed, drop_frac=0.2, empty=(1,)):
    rng = np.random.default_rng(seed)
    g = rng.integers(0, E, M)
    g[rng.random(M) < drop_frac] = E  # dropped (another expert shard's)
    for e in empty:
        g[g == e] = E
    return g.astype(np.int32)


@pytest.mark.parametrize("M,E,block", [(37, 5, 8), (64, 4, 16), (3, 6, 8)])
def test_layout_places_each_group_on_block_boundaries(M, E, block):
    g = _groups(M, E, seed=M)
    lay = jax.tree.map(np.asarray, aligned_layout(jnp.asarray(g), E, block))
    L = buffer_rows(M, E, block)
    assert lay.src_L.shape == (L,) and lay.block_expert.shape == (L // block,)
    counts = np.bincount(g, minlength=E + 1)[:E]
    np.testing.assert_array_equal(lay.sizes_E, -(-counts // block) * block)
    starts = np.cumsum(lay.sizes_E) - lay.sizes_E
    for e in range(E):
        rows = lay.dest_M[g == e]
        # in order, contiguous from the group's block-aligned start
        np.testing.assert_array_equal(rows, starts[e] + np.arange(counts[e]))
        if counts[e]:
            assert set(lay.block_expert[rows // block]) == {e}
    assert np.all(lay.dest_M[g == E] == L)
    live = lay.dest_M[g < E]
    np.testing.assert_array_equal(lay.src_L[live], np.flatnonzero(g < E))
    assert np.sum(lay.src_L < M) == np.sum(g < E)


def _reference(x, w, g):
    """y for each live assignment m: x_m @ w[g_m]; dW[e] = sum over its assignments of x_m^T dy_m."""
    return np.stack([x[m] @ w[g[m]] if g[m] < w.shape[0] else np.zeros(w.shape[2]) for m in range(len(g))])


@pytest.mark.parametrize("chunk_blocks", [None, 1, 3])
def test_values_and_gradients_match_a_numpy_loop(chunk_blocks, monkeypatch):
    if chunk_blocks:  # several scan steps; 3 blocks a step leaves a padded last chunk (10 blocks)
        monkeypatch.setattr(grouped, "_CHUNK_BYTES", chunk_blocks * 6 * 7 * 4)
    M, E, D, F, block = 45, 5, 6, 7, 8
    g = _groups(M, E, seed=3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((M, D))
    w = rng.standard_normal((E, D, F))
    dy = rng.standard_normal((M, F))
    lay = aligned_layout(jnp.asarray(g), E, block)

    def f(x_MD, w_EDF):
        xs = jnp.concatenate([x_MD, jnp.zeros((1, D))])[lay.src_L]
        y = grouped_matmul(xs, w_EDF, lay.sizes_E, lay.block_expert)
        y_MF = jnp.take(y, lay.dest_M, axis=0, mode="fill", fill_value=0.0)
        return jnp.sum(y_MF * dy), y_MF

    (_, y), (dx, dw) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
        jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(y, _reference(x, w, g), rtol=1e-5, atol=1e-5)
    live = g < E
    dx_ref = np.where(live[:, None], np.einsum("mf,mdf->md", dy, w[np.minimum(g, E - 1)]), 0.0)
    dw_ref = np.zeros_like(w)
    for m in np.flatnonzero(live):
        dw_ref[g[m]] += np.outer(x[m], dy[m])
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(dw)[1] == 0)  # group 1 is empty


def test_weight_gradient_memory_is_bounded_by_the_chunk(monkeypatch):
    """Compiled live memory of the weight gradient: a few [chunk, D, F] products, far below the
    dense [E, L, F] float32 intermediate that ragged_dot's own VJP lowers to on GPU."""
    M, E, D, F = 4096, 16, 64, 96
    g = jnp.asarray(np.random.default_rng(1).integers(0, E, M), jnp.int32)
    lay = aligned_layout(g, E, 64)
    L = lay.src_L.shape[0]
    chunk_bytes = 4 * D * F * 4
    monkeypatch.setattr(grouped, "_CHUNK_BYTES", chunk_bytes)
    fn = jax.jit(lambda x, dy: grouped._weight_grad(x, dy, lay.block_expert, E))
    temp = fn.lower(jnp.ones((L, D)), jnp.ones((L, F))).compile().memory_analysis().temp_size_in_bytes
    assert temp <= 2 * chunk_bytes + E * D * F * 4, temp  # products + the accumulator
    assert temp < E * L * F * 4 / 50


def test_forward_and_input_gradient_gather_one_chunk_of_weights_at_a_time(monkeypatch):
    """The block-wise forward/backward keeps one chunk of gathered expert weights live: never the
    per-block weights of the whole buffer ([L / block, D, F]) nor a dense [E, L, F] intermediate."""
    M, E, D, F, block = 1024, 2, 1024, 1024, 64
    lay = aligned_layout(jnp.asarray(np.random.default_rng(2).integers(0, E, M), jnp.int32), E, block)
    L = lay.src_L.shape[0]
    chunk_bytes = D * F * 4  # one block per scan step
    monkeypatch.setattr(grouped, "_CHUNK_BYTES", chunk_bytes)
    loss = lambda x, w: jnp.sum(grouped_matmul(x, w, lay.sizes_E, lay.block_expert) ** 2)
    fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
    temp = fn.lower(jnp.ones((L, D)), jnp.ones((E, D, F))).compile().memory_analysis().temp_size_in_bytes
    bound = 2 * L * (D + F) * 4 + 3 * chunk_bytes + E * D * F * 4  # activations, a few chunks, dW
    all_blocks = (L // block) * D * F * 4
    assert bound < all_blocks / 1.5
    assert temp <= bound, (temp, bound, all_blocks)
