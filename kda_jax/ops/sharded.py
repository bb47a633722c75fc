"""A single-device KDA kernel on a multi-device mesh: ``jax.shard_map`` over batch rows and heads.

Pallas kernels have no SPMD partitioning rule: inside ``jit`` with sharded operands XLA would
gather them onto every device and run the whole call everywhere. The recurrence is independent
across sequences and value heads, so ``kda(...)`` runs such a kernel per shard instead, under the
context mesh (``jax.set_mesh``): batch rows split over the mesh's batch axes and heads over its
tensor axis, as ``kda_jax.models.sharding.LOGICAL_RULES`` lays out activations (``'batch'`` and
``'heads'``); the sequence is never split (architecture.md). An axis whose size does not divide
the dimension is left out (its devices compute the same rows, as GSPMD would have them do).
q/k heads and value heads are split by the same factor, so grouped value heads stay with their
q/k head.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")  # LOGICAL_RULES["batch"]
HEAD_AXIS = "tensor"  # LOGICAL_RULES["heads"]


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    mesh: jax.sharding.AbstractMesh
    batch: tuple[str, ...]  # mesh axes that split the batch rows (may be empty)
    heads: str | None  # the mesh axis that splits the heads, if any

    @property
    def batch_shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.batch)

    @property
    def head_shards(self) -> int:
        return self.mesh.shape[self.heads] if self.heads else 1


def plan(B: int, H: int, HV: int) -> ShardPlan | None:
    """How a call with these sizes splits over the context mesh; None without a multi-device mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    if B % math.prod(mesh.shape[a] for a in batch):
        batch = tuple(a for a in batch if B % mesh.shape[a] == 0)[:1]
    n = mesh.shape[HEAD_AXIS] if HEAD_AXIS in mesh.axis_names else 1
    heads = HEAD_AXIS if n > 1 and H % n == 0 and HV % n == 0 else None
    return ShardPlan(mesh, batch, heads)


def run(fn, sp: ShardPlan, q, k, v, g, beta, *, initial_state=None, resets=None, **kwargs):
    """``fn`` (an implementation on canonical inputs) per shard of ``sp``: (o, final state)."""
    b, h = (sp.batch or None), sp.heads
    tok = P(b, None, h, None)  # [B, T, heads, D]
    state = P(b, h, None, None)
    args = [q, k, v, g, beta]
    specs = [tok, tok, tok, tok, P(b, None, h)]
    if initial_state is not None:
        args.append(initial_state)
        specs.append(state)
    if resets is not None:
        args.append(resets)
        specs.append(P(b, None))

    def local(q, k, v, g, beta, *rest):
        rest = list(rest)
        h0 = rest.pop(0) if initial_state is not None else None
        r = rest.pop(0) if resets is not None else None
        return fn(q, k, v, g, beta, initial_state=h0, resets=r, **kwargs)

    return jax.shard_map(local, mesh=sp.mesh, in_specs=tuple(specs), out_specs=(tok, state),
                         check_vma=False)(*args)
