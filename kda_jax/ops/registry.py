"""Registry of KDA implementations with fail-closed automatic dispatch.

An implementation is a function on canonical inputs (``inputs.Canonical``) plus a
``supports(call) -> str | None`` predicate that returns None when it can run the call, or the
reason it cannot. ``impl="auto"`` walks the registered implementations in priority order
(GPU kernels first, then ``chunked``, then ``reference``) and takes the first whose predicate
accepts the call; a kernel registers with a predicate that accepts exactly what its GPU tests
cover, so an untested configuration never reaches it.

A ``per_shard`` implementation (a kernel with no SPMD partitioning rule) is judged on the call one
shard of the context mesh would make (``sharded.plan``: batch rows and heads split, ``sharded=True``,
one device); ``kda(...)`` then runs it under ``jax.shard_map``. Without a mesh it sees the whole
call and the number of devices of the process.

A ``floors_gate`` implementation receives g before the gate floor (``inputs.apply_gate_floor``,
which ``kda(...)`` applies for every other one) and applies it itself, in a pass it makes over g
anyway.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Call:
    """What a predicate may look at: shapes, dtypes, options and the backend."""

    B: int
    T: int
    H: int
    HV: int
    K: int
    V: int
    qkv_dtype: jnp.dtype
    chunk_size: int
    has_segments: bool
    has_initial_state: bool
    backend: str
    num_devices: int = 1  # devices of the program: a kernel without a partitioning rule must refuse > 1
    sharded: bool = False  # one shard of a multi-device mesh program (run under jax.shard_map)


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    fn: Callable
    supports: Callable[[Call], str | None]
    priority: int  # lower runs first under impl="auto"
    auto: bool
    per_shard: bool = False  # runs per shard of the context mesh (see the module docstring)
    floors_gate: bool = False  # takes g before ``inputs.apply_gate_floor`` and applies it itself


_REGISTRY: dict[str, Impl] = {}


def register(name: str, fn: Callable, supports: Callable[[Call], str | None], *, priority: int, auto: bool = True,
             per_shard: bool = False, floors_gate: bool = False):
    """Add (or replace) an implementation. Kernels use priority < 100; ``chunked`` is 100."""
    _REGISTRY[name] = Impl(name, fn, supports, priority, auto, per_shard, floors_gate)


def unregister(name: str) -> None:
    _REGISTRY.pop(name)


def names() -> list[str]:
    return sorted(_REGISTRY, key=lambda n: _REGISTRY[n].priority)


def describe_call(c, chunk_size: int, plan=None) -> Call:
    """The call on canonical inputs ``c``; with a ``sharded.ShardPlan``, the call of one shard."""
    B, T, H, K = c.q.shape
    HV, V = c.v.shape[2], c.v.shape[3]
    call = Call(B=B, T=T, H=H, HV=HV, K=K, V=V, qkv_dtype=jnp.dtype(c.q.dtype), chunk_size=chunk_size,
                has_segments=c.resets is not None, has_initial_state=c.initial_state is not None,
                backend=jax.default_backend(), num_devices=jax.device_count())
    if plan is None:
        return call
    nb, nh = plan.batch_shards, plan.head_shards
    return dataclasses.replace(call, B=B // nb, H=H // nh, HV=HV // nh, num_devices=1, sharded=True)


def select(impl: str, call: Call, shard_call: Call | None = None) -> Impl:
    """The implementation to run: the named one (if it supports the call) or the first that does.
    ``per_shard`` implementations are judged on ``shard_call`` when there is one."""
    judge = lambda entry: entry.supports(shard_call if entry.per_shard and shard_call is not None else call)
    if impl == "auto":
        reasons = []
        for name in names():
            entry = _REGISTRY[name]
            if not entry.auto:
                continue
            why = judge(entry)
            if why is None:
                return entry
            reasons.append(f"{name}: {why}")
        raise ValueError("no KDA implementation supports this call: " + "; ".join(reasons))
    if impl not in _REGISTRY:
        raise ValueError(f"impl must be 'auto' or one of {names()}, got {impl!r}")
    entry = _REGISTRY[impl]
    why = judge(entry)
    if why is not None:
        raise ValueError(f"impl={impl!r} does not support this call: {why}")
    return entry
