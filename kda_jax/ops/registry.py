"""Registry of KDA implementations with fail-closed automatic dispatch.

An implementation is a function on canonical inputs (``inputs.Canonical``) plus a
``supports(call) -> str | None`` predicate that returns None when it can run the call, or the
reason it cannot. ``impl="auto"`` walks the registered implementations in priority order
(GPU kernels first, then ``chunked``, then ``reference``) and takes the first whose predicate
accepts the call; a kernel registers with a predicate that accepts exactly what its GPU tests
cover, so an untested configuration never reaches it.
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
    num_devices: int = 1  # devices of the process: a kernel without a partitioning rule must refuse > 1


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    fn: Callable
    supports: Callable[[Call], str | None]
    priority: int  # lower runs first under impl="auto"
    auto: bool


_REGISTRY: dict[str, Impl] = {}


def register(name: str, fn: Callable, supports: Callable[[Call], str | None], *, priority: int, auto: bool = True):
    """Add (or replace) an implementation. Kernels use priority < 100; ``chunked`` is 100."""
    _REGISTRY[name] = Impl(name, fn, supports, priority, auto)


def names() -> list[str]:
    return sorted(_REGISTRY, key=lambda n: _REGISTRY[n].priority)


def describe_call(c, chunk_size: int) -> Call:
    B, T, H, K = c.q.shape
    HV, V = c.v.shape[2], c.v.shape[3]
    return Call(B=B, T=T, H=H, HV=HV, K=K, V=V, qkv_dtype=jnp.dtype(c.q.dtype), chunk_size=chunk_size,
                has_segments=c.resets is not None, has_initial_state=c.initial_state is not None,
                backend=jax.default_backend(), num_devices=jax.device_count())


def select(impl: str, call: Call) -> Impl:
    """The implementation to run: the named one (if it supports the call) or the first that does."""
    if impl == "auto":
        reasons = []
        for name in names():
            entry = _REGISTRY[name]
            if not entry.auto:
                continue
            why = entry.supports(call)
            if why is None:
                return entry
            reasons.append(f"{name}: {why}")
        raise ValueError("no KDA implementation supports this call: " + "; ".join(reasons))
    if impl not in _REGISTRY:
        raise ValueError(f"impl must be 'auto' or one of {names()}, got {impl!r}")
    entry = _REGISTRY[impl]
    why = entry.supports(call)
    if why is not None:
        raise ValueError(f"impl={impl!r} does not support this call: {why}")
    return entry
