"""Prefill + decode with caches against one forward pass over the whole sequence."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kda_jax.inference import MLACache, cache_bytes, cache_slots, empty_cache, tree_bytes
from kda_jax.layers import MLAttention
from kda_jax.models import HybridDecoder, get_config, variant
from kda_jax.models.decoder import PREFILL_SEGMENT
from tests.models.helpers import two_layer_config
from tests.ops.helpers import rel_rmse


def _model(name):
    cfg = two_layer_config(dtype="float32")
    return HybridDecoder(cfg if name == "hybrid" else variant(cfg, name), rngs=nnx.Rngs(3))


# Jitted: run eagerly, each of the model's many small ops compiles on first use (16 s for one forward
# pass of the tiny model on a CPU, 3 s jitted).
_forward = jax.jit(lambda m, t: m(t).logits)
_decode = nnx.jit(lambda m, t, c: m.decode(t, c), donate_argnums=2)


@functools.partial(jax.jit, static_argnames=("max_len", "segment"))
def _prefill(m, tokens, prompt_lengths, max_len, segment=PREFILL_SEGMENT):
    return m.prefill(tokens, prompt_lengths, max_len, jnp.float32, segment=segment)


@pytest.mark.parametrize("name,steps", [
    ("hybrid", (1, 1, 1, 1)), ("mla_only", (1, 1, 1, 1)), ("gdn_hybrid", (1, 1, 1, 1)), ("hybrid", (3, 1, 2)),
    pytest.param("mla_only", (3, 1, 2), marks=pytest.mark.slow),
    pytest.param("gdn_hybrid", (3, 1, 2), marks=pytest.mark.slow),
], ids=["hybrid-1", "mla_only-1", "gdn_hybrid-1", "hybrid-3-1-2", "mla_only-3-1-2", "gdn_hybrid-3-1-2"])
def test_prefill_then_decode_equals_one_forward(name, steps):
    m = _model(name)
    T, k = 19, sum(steps)
    toks = jnp.asarray(np.random.default_rng(len(steps)).integers(0, m.config.vocab_size, (2, T + k)), jnp.int32)
    full = _forward(m, toks)
    logits, cache = _prefill(m, toks[:, :T], jnp.full((2,), T), max_len=32)
    assert rel_rmse(logits, full[:, :T]) < 1e-4
    t = T
    for s in steps:
        out, cache = _decode(m, toks[:, t:t + s], cache)
        assert rel_rmse(out, full[:, t:t + s]) < 1e-4, (name, t, s)
        t += s
    assert int(cache.pos) == T + k


def test_prompts_of_different_lengths_equal_each_alone():
    m = _model("hybrid")
    rng = np.random.default_rng(7)
    lengths, T, k = [5, 12, 2], 12, 3
    prompts = [rng.integers(0, m.config.vocab_size, n) for n in lengths]
    nxt = rng.integers(0, m.config.vocab_size, (3, k))
    batch = np.zeros((3, T), np.int32)
    for i, p in enumerate(prompts):
        batch[i, T - len(p):] = p
    logits, cache = _prefill(m, jnp.asarray(batch), jnp.asarray(lengths), max_len=T + k)
    outs = [logits[:, -1]]
    for j in range(k):
        lj, cache = _decode(m, jnp.asarray(nxt[:, j:j + 1], jnp.int32), cache)
        outs.append(lj[:, 0])
    for i, p in enumerate(prompts):  # one compile: right padding never reaches earlier logits
        seq = np.concatenate([p, nxt[i]])
        alone = _forward(m, jnp.asarray(np.pad(seq, (0, T + k - len(seq)))[None], jnp.int32))[0, :len(seq)]
        ref = alone[len(p) - 1:]
        got = jnp.stack([o[i] for o in outs])
        assert rel_rmse(got, ref) < 1e-4, f"prompt {i} (length {len(p)})"


@pytest.mark.parametrize("use_rope,batch,step", [(False, 2, 3), (True, 2, 3), (True, 1, 1)],
                         ids=["nope", "rope", "rope-one-row"])
def test_absorbed_mla_decode_equals_expanded_attention(use_rope, batch, step):
    """``step`` tokens per decode call; batch 1 with one token a call runs the widened one-row
    products (``common.widened``)."""
    mla = MLAttention(48, 3, rngs=nnx.Rngs(0), kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                      v_head_dim=12, use_rope=use_rope)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((batch, 9, 48)), jnp.float32)
    full = mla(x)
    pos = jnp.broadcast_to(jnp.arange(9), (batch, 9))
    y, cache = mla.prefill(x[:, :6], None, pos[:, :6], max_len=16, cache_dtype=jnp.float32)
    start, ys = jnp.zeros((batch,), jnp.int32), [y]
    for t in range(6, 9, step):
        y, cache = mla.decode(x[:, t:t + step], cache, start, jnp.asarray(t), pos[:, t:t + step])
        ys.append(y)
    assert rel_rmse(jnp.concatenate(ys, 1), full) < 1e-5


def test_cache_bytes_match_the_arrays_and_the_papers_reduction():
    for name in ("hybrid", "mla_only", "gdn_hybrid"):
        m = _model(name)  # the shapes and dtypes of the cache prefill builds (traced, not run)
        _, cache = jax.eval_shape(lambda: m.prefill(jnp.zeros((3, 10), jnp.int32), jnp.full((3,), 10), max_len=24))
        counted = cache_bytes(m.config, seq_len=24, batch=3)
        arrays = sum(tree_bytes(c) for c in cache.layers)
        assert counted["total"] == arrays, name
        assert counted["kda_state"] + counted["conv"] == sum(tree_bytes(c) for c in cache.layers if hasattr(c, "state"))
        empty = empty_cache(m.config, 3, 24, pos=10)
        assert jax.tree.map(lambda a: (a.shape, a.dtype), empty) == jax.tree.map(lambda a: (a.shape, a.dtype), cache)
    big = get_config("kimi_linear_48b_a3b")
    hyb, mla = cache_bytes(big, 1 << 20, 1), cache_bytes(variant(big, "mla_only"), 1 << 20, 1)
    assert mla["kda_state"] == 0 and hyb["mla_latent"] * 27 == mla["mla_latent"] * 7
    assert round(100 * (1 - hyb["total"] / mla["total"])) == 74


def test_cache_errors_name_the_problem():
    m = _model("hybrid")
    prefill = lambda n, lengths, max_len: jax.eval_shape(  # raised while tracing (no compile)
        lambda: m.prefill(jnp.zeros((n, 10), jnp.int32), jnp.full((lengths,), 10), max_len=max_len))
    with pytest.raises(ValueError, match="longer than the cache"):
        prefill(1, 1, 8)
    with pytest.raises(ValueError, match="prompt_lengths must have shape"):
        prefill(2, 3, 16)
    with pytest.raises(ValueError, match="seq_len and batch"):
        cache_bytes(m.config, -1, 1)


def _prefill_temp_bytes(cfg, T):
    """Compiled temporary bytes of a batch-1 prefill of T tokens (compiled only, never run)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: HybridDecoder(cfg, rngs=nnx.Rngs(0))))
    fn = jax.jit(lambda s, t, n: nnx.merge(graphdef, s).prefill(t, n, T, last_only=True))
    spec = (jax.ShapeDtypeStruct((1, T), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))
    return fn.lower(state, *spec).compile().memory_analysis().temp_size_in_bytes


def test_prefill_memory_is_linear_in_length():
    """4x the tokens, < 6x the temporary memory: no [B, H, T, T] scores or [T, T] masks (4.0x with
    ``prefill_attention``; the XLA softmax over the whole prompt gave 23x here, and needs 64 GiB of
    float32 scores at 32K tokens for scaling_653m)."""
    cfg = two_layer_config(dtype="float32")
    small, large = _prefill_temp_bytes(cfg, 1024), _prefill_temp_bytes(cfg, 4096)
    assert large / small < 6, (small, large)


def test_prefill_last_only_gives_the_last_logits():
    m = _model("hybrid")
    toks = jnp.asarray(np.random.default_rng(0).integers(0, m.config.vocab_size, (2, 11)), jnp.int32)
    lens = jnp.asarray([11, 4])
    full, c1 = m.prefill(toks, lens, max_len=16)
    last, c2 = m.prefill(toks, lens, max_len=16, last_only=True)
    assert last.shape == (2, 1, m.config.vocab_size) and rel_rmse(last, full[:, -1:]) < 1e-6
    assert all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(c1), jax.tree.leaves(c2)))


def test_prefill_attention_paths_equal_masked_attention():
    """``blockwise_attention`` (any block size, any segments) equals the XLA softmax; the cuDNN
    path's key-hiding feature, run through the XLA softmax, equals it on each row's last document."""
    from kda_jax.layers.mla import _hide_padding_keys, blockwise_attention, causal_attention

    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.standard_normal((2, 37, 3, 24)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((2, 37, 3, 16)), jnp.float32)
    seg = jnp.asarray(np.stack([np.r_[np.zeros(10), np.ones(27)], np.r_[np.zeros(5), np.ones(12), 2 * np.ones(20)]]),
                      jnp.int32)
    for s in (None, seg):
        ref = causal_attention(q, k, v, scale=0.2, segment_ids=s, impl="xla")
        for block in (8, 16, 64):
            np.testing.assert_allclose(blockwise_attention(q, k, v, scale=0.2, segment_ids=s, block=block), ref,
                                       atol=2e-6)
    qa, ka = _hide_padding_keys(q, k, seg)
    assert qa.shape[-1] % 8 == 0
    got = causal_attention(qa, ka, v, scale=0.2, impl="xla")
    last = np.asarray(seg == seg[:, -1:])[:, :, None, None]
    assert bool(jnp.isfinite(got).all())
    np.testing.assert_allclose(np.where(last, got, 0), np.where(last, ref, 0), atol=1e-6)


@pytest.mark.parametrize("name", ["hybrid", pytest.param("gdn_hybrid", marks=pytest.mark.slow),
                                  pytest.param("mamba2_hybrid", marks=pytest.mark.slow)])
def test_segmented_prefill_equals_one_pass(name):
    """KDA layers and FFNs run in time segments (state and conv caches carried, reset at a new
    document): the same logits and caches as one pass, with the left padding ending inside a
    segment and exactly on a segment boundary (T = 50 runs as 64 = 14 front + 50 with segment 16,
    so row 1's 18 padding tokens end at 32; as 75 = 25 + 50 with segment 25, row 2's at 50)."""
    m = _model(name)
    T = 50
    toks = jnp.asarray(np.random.default_rng(11).integers(0, m.config.vocab_size, (3, T)), jnp.int32)
    lens = jnp.asarray([50, 32, 25])
    full, cache = _prefill(m, toks, lens, 64, segment=None)
    for segment in (16, 25):
        logits, seg_cache = _prefill(m, toks, lens, 64, segment=segment)
        for b, n in enumerate(np.asarray(lens)):  # the prompt positions of each row
            assert rel_rmse(logits[b, T - n:], full[b, T - n:]) < 1e-5, (segment, b)
        leaves, seg_leaves = jax.tree.leaves(cache), jax.tree.leaves(seg_cache)
        assert len(leaves) == len(seg_leaves)
        for a, s in zip(leaves, seg_leaves):
            assert np.abs(np.asarray(a)).max() == 0 or rel_rmse(s, a) < 1e-5, segment


def _decode_temp_bytes(mla, x, cache, start, pos, positions):
    """XLA's temporary bytes of one compiled ``mla.decode`` step (nothing run)."""
    graphdef, state = nnx.split(mla)
    step = jax.jit(lambda s, x, c: nnx.merge(graphdef, s).decode(x, c, start, pos, positions))
    return step.lower(state, x, cache).compile().memory_analysis().temp_size_in_bytes


def test_absorbed_decode_reads_a_bf16_cache_without_a_float32_copy():
    """Decode over a bf16 latent cache: close to the float32 result, and no float32 copy of the
    cache among the step's temporaries (XLA memory analysis, cache 4096 slots)."""
    mla = MLAttention(48, 3, rngs=nnx.Rngs(0), kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                      v_head_dim=12, use_rope=False)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 40, 48)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(40), (2, 40))
    start = jnp.zeros((2,), jnp.int32)
    outs = {}
    for dt in (jnp.float32, jnp.bfloat16):
        _, cache = mla.prefill(x[:, :39], None, pos[:, :39], max_len=4096, cache_dtype=dt)
        outs[dt] = mla.decode(x[:, 39:], cache, start, jnp.asarray(39), pos[:, 39:])[0]
    assert rel_rmse(outs[jnp.bfloat16], outs[jnp.float32]) < 2e-2
    temp = _decode_temp_bytes(mla, x[:, 39:], cache, start, jnp.asarray(39), pos[:, 39:])
    latent_f32_bytes = cache.latent.size * 4
    assert temp < latent_f32_bytes / 2, (temp, latent_f32_bytes)


def test_cache_slots_round_up_to_the_slot_multiple():
    assert [cache_slots(n) for n in (0, 1, 1024, 1025, 131084)] == [0, 1024, 1024, 2048, 132096]
    with pytest.raises(ValueError, match="tokens must be >= 0"):
        cache_slots(-1)


@pytest.mark.gpu
def test_gpu_decode_step_has_no_copy_of_the_latent_cache():
    """One MLA layer of the 653M model, batch 1, a cache of ``cache_slots(131_084)`` slots: no copy
    of the latent among the step's temporaries (at 131,084 slots XLA's split-K product pads the
    whole cache every step: 143.7 MB of temporaries, measured on an H100; 21.1 MB at these slots,
    mostly the float32 scores and weights)."""
    slots = cache_slots(131_084)
    mla = MLAttention(1216, 16, rngs=nnx.Rngs(0), kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                      v_head_dim=128, use_rope=False, dtype=jnp.bfloat16)
    x = jnp.zeros((1, 1, 1216), jnp.bfloat16)
    cache = MLACache(latent=jnp.zeros((1, slots, 512), jnp.bfloat16), k_pe=jnp.zeros((1, slots, 64), jnp.bfloat16))
    temp = _decode_temp_bytes(mla, x, cache, jnp.zeros((1,), jnp.int32), jnp.asarray(131072), jnp.full((1, 1), 131072))
    assert temp < tree_bytes(cache) / 2, (temp, tree_bytes(cache))  # a copy needs at least the latent's bytes
