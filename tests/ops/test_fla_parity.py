"""Parity with flash-linear-attention 0.6.0's ``naive_recurrent_kda`` (float32, CPU, torch autograd).

Fixtures: ``tests/fixtures/fla_kda_naive.npz``, written by ``tests/fixtures/make_fla_fixtures.py``
(its docstring says how to build the torch environment it needs). Outputs, final states and the
gradients of ``sum(o * do) + sum(S * dS)`` are compared with the relative-RMSE thresholds of
kda_spec §5.3.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kda_jax.ops import kda
from tests.ops.helpers import GRAD_NAMES, TOL, assert_close

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "fla_kda_naive.npz"
IMPLS = [("chunked", 64), ("chunked", 32), ("reference", 64)]
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def _load():
    if not FIXTURE.exists():
        return None, []
    data = np.load(FIXTURE)
    return data, json.loads(str(data["meta"]))["cases"]


DATA, CASES = _load()
pytestmark = pytest.mark.skipif(
    DATA is None,
    reason=f"{FIXTURE} is missing: run `.torchenv/bin/python tests/fixtures/make_fla_fixtures.py` "
    "(see its docstring for the torch environment)",
)


@pytest.mark.parametrize("impl,chunk_size", IMPLS, ids=[f"{n}-C{c}" if n == "chunked" else n for n, c in IMPLS])
@pytest.mark.parametrize("case", CASES or [None], ids=[c["name"] for c in CASES] or ["no-fixture"])
def test_matches_fla_naive_recurrent_kda(case, impl, chunk_size):
    i = case["index"]
    x = {n: jnp.asarray(DATA[f"case{i}/{n}"]) for n in ("q", "k", "v", "g", "beta", "h0", "do", "dS")}
    seg = jnp.asarray(DATA[f"case{i}/segment_ids"]) if case["segments"] else None

    def loss(q, k, v, g, beta, h0):
        o, S = kda(q, k, v, g, beta, scale=case["scale"], initial_state=h0, output_final_state=True,
                   segment_ids=seg, chunk_size=chunk_size, impl=impl)
        return jnp.sum(o * x["do"]) + jnp.sum(S * x["dS"]), (o, S)

    args = tuple(x[n] for n in GRAD_NAMES)
    assert all(a.dtype == jnp.float32 for a in args)
    # XLA's CPU backend at optimisation level 0 halves the compile time, which is nearly all of
    # this test's time at these sizes; the default pipeline is covered by test_chunked.py.
    step = jax.jit(jax.grad(loss, argnums=tuple(range(6)), has_aux=True)).lower(*args)
    grads, (o, S) = step.compile(compiler_options=COMPILER_OPTIONS)(*args)

    label = f"{case['name']} {impl} C={chunk_size}"
    assert o.dtype == jnp.float32
    assert_close(f"{label} o", o, DATA[f"case{i}/o"], TOL["o"])
    assert_close(f"{label} state", S, DATA[f"case{i}/S"], TOL["state"])
    for n, d in zip(GRAD_NAMES, grads):
        assert_close(f"{label} d{n}", d, DATA[f"case{i}/d{n}"], TOL[n])
