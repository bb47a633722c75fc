"""The ``mamba2_hybrid`` twin: scalar GDN gate + additive write, the paper's Mamba2-like baseline."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kda_jax.models import VARIANTS, HybridDecoder, ModelConfig, get_config, variant
from tests.models.helpers import two_layer_config
from tests.ops.helpers import rel_rmse


@pytest.mark.parametrize("base", ["tiny", "kimi_linear_48b_a3b"])
def test_twin_differs_only_in_gate_and_rule(base):
    c = get_config(base)
    twin = variant(c, "mamba2_hybrid")
    assert "mamba2_hybrid" in VARIANTS
    changed = {f.name for f in dataclasses.fields(c) if getattr(c, f.name) != getattr(twin, f.name)}
    assert changed == {"kda_gate", "kda_rule"}
    assert (twin.kda_gate, twin.kda_rule, c.kda_rule) == ("gdn", "additive", "delta")
    assert get_config(base + "_mamba2_hybrid") == twin


def test_rule_is_validated_and_reaches_every_kda_layer():
    with pytest.raises(ValueError, match="kda_rule must be 'delta' or 'additive', got 'mamba'"):
        get_config("tiny", kda_rule="mamba")
    with pytest.raises(ValueError, match="kda_rule='additive' needs the scalar decay kda_gate='gdn'"):
        ModelConfig(kda_rule="additive")
    m = nnx.eval_shape(lambda: HybridDecoder(get_config("tiny_mamba2_hybrid"), rngs=nnx.Rngs(0)))
    rules = [(b.self_attn.gate, b.self_attn.rule) for b in m.layers if b.is_kda]
    assert rules and set(rules) == {("gdn", "additive")}


def test_prefill_then_decode_equals_one_forward():
    m = HybridDecoder(variant(two_layer_config(dtype="float32"), "mamba2_hybrid"), rngs=nnx.Rngs(3))
    T, steps = 19, (1, 2)
    toks = jnp.asarray(np.random.default_rng(1).integers(0, m.config.vocab_size, (2, T + sum(steps))), jnp.int32)
    full = nnx.jit(lambda m, t: m(t).logits)(m, toks)
    logits, cache = nnx.jit(lambda m, t: m.prefill(t, jnp.full((2,), T), max_len=32, cache_dtype=jnp.float32))(
        m, toks[:, :T])
    assert rel_rmse(logits, full[:, :T]) < 1e-4
    decode = nnx.jit(lambda m, t, c: m.decode(t, c), donate_argnums=2)
    t = T
    for s in steps:
        out, cache = decode(m, toks[:, t:t + s], cache)
        assert rel_rmse(out, full[:, t:t + s]) < 1e-4, (t, s)
        t += s
