"""``Trainer``: the model's state layout, shardings and compiled init / train / eval steps on a mesh.

Used by the training loop and usable on its own (tests, notebooks): ``Trainer.build(model_config,
optim_config, train_config, mesh)`` then ``state = trainer.init()`` and
``state, metrics = trainer.step(state, batch)`` with a global batch from ``train.mesh.global_batch``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from kda_jax.data.synthetic import summarize
from kda_jax.layers.moe import RouterBias
from kda_jax.models import HybridDecoder
from kda_jax.models.sharding import abstract_module, state_shardings
from kda_jax.train.mesh import batch_sharding, global_batch
from kda_jax.train.optim import make_optimizer
from kda_jax.train.step import make_eval_step, make_train_step


@dataclasses.dataclass
class Trainer:
    """The compiled pieces of a run; ``init()`` / ``step()`` / ``evaluate()`` for scripts and notebooks."""

    model_config: object
    mesh: jax.sharding.Mesh
    graphdef: object
    tx: object
    lr: object
    state_shardings: dict
    abstract_state: dict
    init: object
    step: object
    eval_step: object

    @classmethod
    def build(cls, model_config, optim, train, mesh) -> "Trainer":
        """Compile init/step/eval of ``model_config`` (a ModelConfig) with ``optim`` (OptimConfig) and
        ``train`` (TrainConfig) over ``mesh``."""
        cfg, seed = model_config, train.seed
        make_model = lambda: HybridDecoder(cfg, rngs=nnx.Rngs(seed))
        with jax.set_mesh(mesh):
            graphdef, abs_params, abs_router = nnx.split(abstract_module(make_model), nnx.Param, RouterBias)
            tx, lr = make_optimizer(optim, abs_params, train.steps)
            param_sh = nnx.to_pure_dict(state_shardings(abs_params, mesh))
            router_sh = nnx.to_pure_dict(state_shardings(abs_router, mesh))
            abs_p = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                                 nnx.to_pure_dict(abs_params), param_sh)
            opt_sh = jax.jit(tx.init).lower(abs_p).compile().output_shardings
            scalar = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            shardings = {"params": param_sh, "router": router_sh, "opt": opt_sh, "step": scalar, "bad_steps": scalar}

            def init():
                model = make_model()
                _, params, router = nnx.split(model, nnx.Param, RouterBias)
                params = nnx.to_pure_dict(params)
                return {"params": params, "router": nnx.to_pure_dict(router), "opt": tx.init(params),
                        "step": jnp.zeros((), jnp.int32), "bad_steps": jnp.zeros((), jnp.int32)}

            init = jax.jit(init, out_shardings=shardings)
            abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    jax.eval_shape(init), shardings)
            t = train
            step = jax.jit(make_train_step(graphdef, tx, microbatches=t.microbatches, z_loss=t.z_loss,
                                           router_bias_rate=t.router_bias_rate if cfg.num_experts else 0.0),
                           in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, None),
                           donate_argnums=0)
            eval_step = jax.jit(make_eval_step(graphdef), in_shardings=(shardings, batch_sharding(mesh)))
        return cls(cfg, mesh, graphdef, tx, lr, shardings, abstract, init, step, eval_step)

    def model(self, state) -> HybridDecoder:
        return nnx.merge(self.graphdef, state["params"], state["router"])

    def evaluate(self, state, batches, *, exact_match: bool = False) -> dict:
        """Validation loss, perplexity, bits per token and greedy next-token accuracy on the supervised
        positions; with ``exact_match`` (one example per row: synthetic tasks) also the share of rows
        whose every answer is right."""
        sums: dict = {}
        with jax.set_mesh(self.mesh):
            for b in batches:
                out = jax.device_get(self.eval_step(state, global_batch(b, self.mesh)))
                sums = {k: sums.get(k, 0.0) + float(v) for k, v in out.items()}
        loss = sums.get("nll_sum", 0.0) / max(sums.get("tokens", 0.0), 1.0)
        result = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_bits_per_token": loss / math.log(2)}
        if sums:
            answers = {k: float(v) for k, v in summarize(sums).items()}
            result["val_token_accuracy"] = answers["token_accuracy"]
            if exact_match:
                result["val_exact_match"] = answers["exact_match"]
        return result


def sample_text(trainer: Trainer, state, tokenizer, prompt: str, num_tokens: int, *, temperature: float = 0.8,
                seed: int = 0) -> str:
    """The prompt and ``num_tokens`` sampled after it, with cached decoding (``kda_jax.inference``)."""
    from kda_jax.inference import Generator, Sampling

    model = trainer.model(jax.device_get(state))
    ids = list(tokenizer.encode(prompt)) or [0]
    gen = Generator(model, max_len=-(-len(ids) // 64) * 64 + num_tokens, sampling=Sampling(temperature=temperature))
    return tokenizer.decode(ids + gen.generate([ids], num_tokens, seed=seed)[0])
