"""The jitted train and eval steps over a device mesh.

Train state (a pytree of arrays, what a checkpoint holds):
``{"params": pure dict of nnx.Param, "router": pure dict of MoE correction biases,
"opt": optax state, "step": int32, "bad_steps": int32 (consecutive non-finite steps)}``.

One step: the global batch is split into ``microbatches`` parts; gradients of the summed
masked cross-entropy (+ z-loss, + MoE auxiliary loss) are accumulated with ``lax.scan`` and
divided by the number of supervised tokens, so accumulation equals one big batch. Then
global-norm clipping and the optimiser (``train.optim``); the MoE correction biases move by
the sign of the load error (aux-loss-free balancing, outside the gradient). A step whose loss
or gradient norm is not finite changes nothing but the ``bad_steps`` counter.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kda_jax.data.synthetic import answer_metrics
from kda_jax.layers.moe import RouterBias

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def _forward(graphdef, params, router, batch):
    model = nnx.merge(graphdef, params, router)
    seg = batch["segment_ids"]
    out = model(batch["tokens"], segment_ids=seg, positions=batch["positions"], token_mask=seg > 0)
    return model, out


def token_losses(logits, targets, mask, z_loss: float):
    """Summed masked cross-entropy (+ z_loss · logsumexp²) and the number of supervised tokens."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    nll = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(z_loss * lse**2 * mask), jnp.sum(mask)


def make_train_step(graphdef, tx: optax.GradientTransformation, *, microbatches: int = 1, z_loss: float = 0.0,
                    router_bias_rate: float = 0.0) -> Callable:
    """``step(state, batch) -> (state, metrics)``; wrap it in ``jax.jit`` with shardings (``train.loop``)."""

    def micro_grads(params, router, batch):
        def loss_fn(p):
            _, out = _forward(graphdef, p, router, batch)
            nll, zl, n = token_losses(out.logits, batch["targets"], batch["loss_mask"], z_loss)
            aux = out.aux_loss * n  # the per-token auxiliary loss, weighted like the tokens it came from
            loads = tuple(s.load for s in out.router_stats)
            return nll + zl + aux, (nll, zl, aux, n, loads)

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    def step(state, batch):
        params, router = state["params"], state["router"]
        B = batch["tokens"].shape[0]
        if B % microbatches:
            raise ValueError(f"global batch {B} is not divisible by microbatches={microbatches}")
        split = jax.tree.map(lambda x: x.reshape(microbatches, B // microbatches, *x.shape[1:]), batch)

        def body(acc, mb):
            (_, aux), g = micro_grads(params, router, mb)
            return jax.tree.map(jnp.add, acc, (g, aux)), None

        # gradients accumulate in float32 whatever the parameter dtype (bf16 sums of micro-batches lose bits)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params)
        first = jax.tree.map(lambda x: x[0], split)
        aux_shape = jax.eval_shape(lambda: micro_grads(params, router, first)[0][1])
        acc0 = (zeros, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape))
        (grads, (nll, zl, aux, n, loads)), _ = jax.lax.scan(body, acc0, split)
        n = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda g: g / n, grads)
        loss = (nll + zl + aux) / n
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        updates, new_opt = tx.update(grads, state["opt"], params)
        new_params = optax.apply_updates(params, updates)
        new_router = router
        if router_bias_rate and loads:
            model = nnx.merge(graphdef, params, router)
            model.update_router_biases([l / microbatches for l in loads], router_bias_rate)
            new_router = nnx.to_pure_dict(nnx.state(model, RouterBias))
        # every state leaf keeps its dtype (bf16 parameters and moments stay bf16 after float32 updates), so
        # the state matches the abstract state of checkpoints and the step compiles once
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a.astype(b.dtype), b), new, old)
        new_state = {
            "params": keep(new_params, params), "opt": keep(new_opt, state["opt"]),
            "router": keep(new_router, router), "step": state["step"] + 1,
            "bad_steps": jnp.where(finite, 0, state["bad_steps"] + 1),
        }
        metrics = {"loss": loss, "nll": nll / n, "z_loss": zl / n, "aux_loss": aux / n, "grad_norm": grad_norm,
                   "tokens": n, "finite": finite.astype(jnp.float32)}
        if loads:
            load = jnp.stack(loads) / microbatches
            metrics["router_max_violation"] = jnp.max(jnp.max(load, -1) / jnp.mean(load, -1) - 1.0)
        return new_state, metrics

    return step


def make_eval_step(graphdef) -> Callable:
    """``eval(state, batch) -> {"nll_sum", "tokens", "correct", "supervised", "exact", "examples"}``: the
    masked cross-entropy and the greedy answers' counts (``kda_jax.data.synthetic.answer_metrics``), summed."""

    def evaluate(state, batch):
        _, out = _forward(graphdef, state["params"], state["router"], batch)
        nll, _, n = token_losses(out.logits, batch["targets"], batch["loss_mask"], 0.0)
        return {"nll_sum": nll, "tokens": n, **answer_metrics(jnp.argmax(out.logits, -1), batch)}

    return evaluate
