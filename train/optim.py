"""Optimisers (AdamW, Muon), weight-decay masks and learning-rate schedules.

Weight decay never touches parameters marked ``no_decay`` by the layers (norm weights, A_log,
dt_bias) nor vectors; the input embedding is decayed only with ``decay_embeddings``. Muon
(``optax.contrib.muon``, Nesterov, Newton–Schulz, update RMS matched to AdamW by
``consistent_rms``) trains the matrices of the mixers and FFNs — stacked routed experts
``[E, in, out]`` orthogonalised per expert — while AdamW trains the embedding, the head, norms
and other vectors (the Moonlight recipe, kimi_linear_model §4.1).
"""

from __future__ import annotations

import jax
import optax
from flax import nnx
from optax.contrib import MuonDimensionNumbers

_EMBEDDINGS = ("embed_tokens", "lm_head")


def schedule(config, steps: int) -> optax.Schedule:
    """Warmup then cosine / WSD / constant; the peak is ``learning_rate``, the floor ``min_lr_ratio`` × peak."""
    peak, floor = config.learning_rate, config.learning_rate * config.min_lr_ratio
    warmup = min(config.warmup_steps, steps)
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1), floor)
    ramp = optax.linear_schedule(0.0, peak, max(warmup, 1))
    if config.schedule == "constant":
        return optax.join_schedules([ramp, optax.constant_schedule(peak)], [warmup])
    decay = int(round(config.decay_fraction * steps))
    stable_end = max(steps - decay, warmup)
    return optax.join_schedules(
        [ramp, optax.constant_schedule(peak), optax.linear_schedule(peak, floor, max(decay, 1))], [warmup, stable_end])


def _is_matrix(path, var) -> bool:
    return var.get_value().ndim >= 2 and path[-1] not in _EMBEDDINGS


def map_params(fn, params: nnx.State) -> dict:
    """Nested dict (the layout of ``nnx.to_pure_dict(params)``) of ``fn(path, variable)``."""
    out: dict = {}
    for path, var in nnx.to_flat_state(params):
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = fn(path, var)
    return out


def decay_mask(params: nnx.State, decay_embeddings: bool) -> dict:
    """True where weight decay applies: matrices not marked ``no_decay``, the embedding if asked."""

    def one(path, var):
        if var.get_metadata().get("no_decay") or var.get_value().ndim < 2:
            return False
        return decay_embeddings or path[-1] != "embed_tokens"

    return map_params(one, params)


def make_optimizer(config, params: nnx.State, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimiser and its schedule (for logging).

    ``params`` is the (abstract) ``nnx.State`` of the model's ``nnx.Param``s; the optimiser acts on
    its pure-dict form ``nnx.to_pure_dict(params)``.
    """
    lr = schedule(config, steps)
    wd_mask = decay_mask(params, config.decay_embeddings)
    if config.name == "adamw":
        tx = optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay,
                         mask=wd_mask)
    else:
        labels = map_params(lambda p, v: "muon" if _is_matrix(p, v) else "adam", params)

        def dims(tree):  # Muon on [in, out] matrices and per expert on [E, in, out]
            return jax.tree.map(lambda x: MuonDimensionNumbers(x.ndim - 2, x.ndim - 1), tree)

        tx = optax.partition({
            "muon": optax.contrib.muon(
                lr, ns_steps=config.muon_ns_steps, beta=config.muon_momentum, eps=config.eps,
                weight_decay=config.weight_decay, nesterov=True, muon_weight_dimension_numbers=dims,
                consistent_rms=config.muon_rms),
            "adam": optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay,
                                mask=wd_mask),
        }, labels)
    if config.clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(config.clip_norm), tx)
    return tx, lr
