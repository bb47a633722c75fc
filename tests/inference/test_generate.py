"""Sampling, the batched generator and the kda-generate command."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kda_jax.inference import Generator, Sampling, sample
from kda_jax.inference.generate import main as generate_main
from kda_jax.models import HybridDecoder
from tests.models.helpers import two_layer_config


def test_sampling_rules():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((4, 50)), jnp.float32)
    key = jax.random.key(3)
    greedy = jnp.argmax(logits, -1)
    assert (sample(logits, key, Sampling(temperature=0)) == greedy).all()
    assert (sample(logits, key, Sampling(temperature=1.0, top_k=1)) == greedy).all()
    assert (sample(logits, key, Sampling(temperature=1.0, top_p=1e-6)) == greedy).all()
    a, b = (sample(logits, jax.random.key(s), Sampling(temperature=1.0)) for s in (5, 5))
    assert (a == b).all()
    top3 = jax.lax.top_k(logits, 3)[1]
    draws = jnp.stack([sample(logits, jax.random.key(s), Sampling(temperature=2.0, top_k=3)) for s in range(40)])
    assert all(bool(jnp.isin(draws[:, r], top3[r]).all()) for r in range(4))
    probs = jax.nn.softmax(logits, -1)
    order = jnp.argsort(-probs, -1)
    nucleus = [set(np.asarray(order[r, : int(jnp.searchsorted(jnp.cumsum(probs[r, order[r]]), 0.5)) + 1]).tolist())
               for r in range(4)]
    draws = np.asarray(jnp.stack([sample(logits, jax.random.key(s), Sampling(top_p=0.5)) for s in range(40)]))
    assert all(set(draws[:, r].tolist()) <= nucleus[r] for r in range(4))
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)


def test_generator_greedy_equals_full_forward_and_stops():
    m = HybridDecoder(two_layer_config(dtype="float32"), rngs=nnx.Rngs(1))
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6, 5, 3]]
    gen = Generator(m, max_len=80, sampling=Sampling(temperature=0), pad_multiple=16)
    seen = []
    out = gen.generate(prompts, 5, on_token=lambda i, ids: seen.append(ids.tolist()))
    forward = nnx.jit(lambda m, t: m(t).logits[0])  # one compile: right padding never reaches earlier logits
    for p, o in zip(prompts, out):
        ids = list(p)
        for _ in range(5):
            ids.append(int(jnp.argmax(forward(m, jnp.asarray([ids + [0] * (16 - len(ids))]))[len(ids) - 1])))
        assert o == ids[len(p):]
    assert [s for s in seen] == [list(t) for t in zip(*out)]
    stop = out[0][1]
    stopped = gen.generate(prompts, 5, stop_tokens=[stop])
    assert stopped[0] == out[0][:2]
    with pytest.raises(ValueError, match="exceed the cache"):
        gen.generate(prompts, 70)
    sampler = Generator(m, max_len=80, sampling=Sampling(temperature=1.0), pad_multiple=16)
    assert sampler.generate(prompts, 6, seed=4) == sampler.generate(prompts, 6, seed=4)
    assert gen._step._cache_size() == 1  # one decode compile for every step and call


@pytest.mark.xdist_group("text_run")
def test_generate_command_from_a_training_workdir(text_run, tmp_path, capsys):
    """From the workdir of the text run of tests/train/test_loop.py (the session fixture ``text_run``)."""
    assert generate_main(["--workdir", str(text_run.workdir), "--prompt", "to be", "--max_new_tokens", "12",
                          "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("to be") and len(text) >= len("to be") + 12  # 12 byte tokens streamed, then a newline
    with pytest.raises(FileNotFoundError, match="no checkpoints/ folder"):
        generate_main(["--workdir", str(tmp_path)])


def test_sharded_generation_equals_unsharded():
    """A model created sharded over 8 devices (data 2 × fsdp 2 × tensor 2) generates the same
    tokens, with its cache sharded by ``cache_shardings``."""
    from kda_jax.models.sharding import create_sharded
    from kda_jax.train.config import MeshConfig
    from kda_jax.train.mesh import make_mesh

    cfg = two_layer_config(dtype="float32")
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2, expert=1), jax.devices()[:8])
    prompts = [[3, 1, 4], [1, 5], [9, 2, 6, 5], [3, 5]]
    plain = Generator(HybridDecoder(cfg, rngs=nnx.Rngs(2)), max_len=32, sampling=Sampling(temperature=0),
                      pad_multiple=8).generate(prompts, 6)
    with jax.set_mesh(mesh):
        model = create_sharded(lambda: HybridDecoder(cfg, rngs=nnx.Rngs(2)), mesh)
        gen = Generator(model, max_len=32, sampling=Sampling(temperature=0), pad_multiple=8, mesh=mesh)
        assert gen.generate(prompts, 6) == plain
        _, cache = gen._prefill(gen.state(), jnp.zeros((4, 8), jnp.int32), jnp.full((4,), 8), jax.random.key(0))
    kda_state = next(c.state for c in cache.layers if hasattr(c, "state"))
    latent = next(c.latent for c in cache.layers if hasattr(c, "latent"))
    assert kda_state.sharding.spec[0] == ("data", "fsdp") and latent.sharding.spec[0] == ("data", "fsdp")
