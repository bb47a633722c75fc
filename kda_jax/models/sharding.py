"""The one table of logical-axis rules, and sharded model creation.

Layers name their parameter axes logically (``embed``, ``heads``, ``mlp``, ``expert``, ...);
this table maps each name to mesh axes of ``('data', 'fsdp', 'tensor', 'expert')``. The default
is FSDP over ``embed`` with tensor parallelism over heads/MLP width and expert parallelism over
routed experts; a mesh axis of size 1 costs nothing, so the same rules serve every layout.
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),   # activations and data
    "length": None,
    "embed": "fsdp",             # model width: FSDP shards every matrix along it
    "vocab": "tensor",
    "heads": "tensor",           # flattened heads x head_dim of projections
    "head_dim": None,
    "q_lora": None,
    "kv_lora": None,
    "gate_rank": None,           # low-rank gate bottlenecks (128 in the release)
    "conv_width": None,
    "mlp": "tensor",             # dense and shared-expert hidden width
    "expert": "expert",          # routed experts
    "expert_mlp": "tensor",      # routed-expert hidden width
    "norm": None,
}


def logical_to_mesh(axes: tuple[str | None, ...], rules=None) -> P:
    """PartitionSpec for logical ``axes``; a mesh axis is used at most once per spec."""
    rules = LOGICAL_RULES if rules is None else rules
    used, out = set(), []
    for name in axes:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise ValueError(f"unknown logical axis {name!r}; known: {sorted(rules)}")
        mesh_axes = rules[name]
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        used.update(mesh_axes)
        out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*out)


def _fit(spec: P, shape, mesh) -> P:
    """Drop mesh axes that do not divide the dimension they shard (small test models)."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        size = 1
        for a in axes:
            size *= mesh.shape[a]
        out.append(entry if dim % size == 0 else None)
    return P(*out)


def state_shardings(abstract_state, mesh, rules=None):
    """NamedShardings for an (abstract) ``nnx.State`` whose variables carry logical axes."""

    def one(var):
        axes = var.get_metadata().get("out_sharding")
        value = var.get_value()
        if axes is None:
            spec = P()
        else:
            spec = _fit(logical_to_mesh(axes, rules), value.shape, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_module(make_module: Callable[[], nnx.Module], rules=None) -> nnx.Module:
    """``nnx.eval_shape(make_module)``, also valid inside ``jax.set_mesh`` (logical names resolved)."""
    rules = LOGICAL_RULES if rules is None else rules
    with nnx.logical_axis_rules(list(rules.items())):
        return nnx.eval_shape(make_module)


def create_sharded(make_module: Callable[[], nnx.Module], mesh, rules=None) -> nnx.Module:
    """Build ``make_module()`` directly onto ``mesh``: each parameter is created on its shards.

    ``make_module`` must be pure (take its randomness from a seeded ``nnx.Rngs`` built inside),
    so the sharded parameters equal those of an unsharded ``make_module()``.
    """
    graphdef, abstract_state = nnx.split(abstract_module(make_module, rules))
    shardings = state_shardings(abstract_state, mesh, rules)

    def init():
        return nnx.state(make_module())

    state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)
