"""kda_jax.ops.linear_attn (module additive: scalar decay, additive write) against float64 token loops.

The JAX token loop ``linear_attn_reference`` is first checked against a plain NumPy loop written
here from the recurrence; it then serves as the float64 oracle for values and gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kda_jax.ops import linear_attn, linear_attn_chunked, linear_attn_decode, linear_attn_reference
from kda_jax.ops.inputs import resets_from_segment_ids
from tests.ops.helpers import GRAD_NAMES, TOL, assert_close, cotangents, make_inputs, value_and_grads


def _inputs(B, T, H, HV, K, V, *, dtype=jnp.float32, gate="normal", seed=0):
    """``make_inputs`` with one gate per value head and token (its first channel)."""
    x = make_inputs(B, T, H, HV, K, V, dtype=dtype, gate=gate, seed=seed)
    return dict(x, g=x["g"][..., 0])


def _numpy_loop(q, k, v, g, beta, scale, h0=None, seg=None):
    """S ← 0 at a document start; S ← e^g S + β k vᵀ; o = scale Sᵀ q — float64, one token at a time."""
    q, k, v, g, beta = (np.asarray(a, np.float64) for a in (q, k, v, g, beta))
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    o, S_T = np.zeros((B, T, HV, V)), np.zeros((B, HV, K, V))
    for b in range(B):
        for h in range(HV):
            hq = h // (HV // H)
            S = np.zeros((K, V)) if h0 is None else np.asarray(h0[b, h], np.float64)
            for t in range(T):
                if seg is not None and t > 0 and seg[b, t] != seg[b, t - 1]:
                    S = np.zeros((K, V))
                S = np.exp(g[b, t, h]) * S + beta[b, t, h] * np.outer(k[b, t, hq], v[b, t, h])
                o[b, t, h] = scale * S.T @ q[b, t, hq]
            S_T[b, h] = S
    return o, S_T


def _chunked(C, resets=None):
    return jax.jit(lambda q, k, v, g, beta, h0: linear_attn_chunked(q, k, v, g, beta, scale=q.shape[-1] ** -0.5,
                                                                    initial_state=h0, resets=resets, chunk_size=C))


def _oracle(x, resets=None):
    x64 = {n: jnp.asarray(x[n], jnp.float64) for n in GRAD_NAMES}
    fn = jax.jit(lambda q, k, v, g, beta, h0: linear_attn_reference(q, k, v, g, beta, scale=q.shape[-1] ** -0.5,
                                                                    initial_state=h0, resets=resets))
    B, T, HV, V = x["v"].shape
    do, dS = cotangents((B, T, HV, V), (B, HV, x["q"].shape[-1], V))
    return value_and_grads(fn, x64, do, dS), (do, dS)


def _segments(B, T, bounds):
    seg = np.zeros((B, T), np.int32)
    for b in bounds:
        seg[:, b:] += 1
    return seg


def test_reference_is_the_numpy_recurrence():
    x = _inputs(2, 45, 1, 2, 8, 6, gate="strong", seed=1)
    seg = _segments(2, 45, [3, 17, 18])
    o, S = linear_attn_reference(*(jnp.asarray(x[n], jnp.float64) for n in ("q", "k", "v", "g", "beta")), scale=0.7,
                                 initial_state=jnp.asarray(x["h0"], jnp.float64),
                                 resets=resets_from_segment_ids(jnp.asarray(seg)))
    o_np, S_np = _numpy_loop(x["q"], x["k"], x["v"], x["g"], x["beta"], 0.7, x["h0"], seg)
    np.testing.assert_allclose(o, o_np, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(S, S_np, rtol=1e-12, atol=1e-12)


def test_no_decay_is_causal_linear_attention():
    """g = 0, β = 1: o_t = scale Σ_{s ≤ t} (q_t·k_s) v_s, a hand-derived closed form."""
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 37, 1, 8)) for _ in range(3))
    scores = np.tril(np.einsum("tk,sk->ts", q[0, :, 0], k[0, :, 0]))
    want = 0.5 * scores @ v[0, :, 0]
    o, _ = linear_attn(*(jnp.asarray(a) for a in (q, k, v)), jnp.zeros((1, 37, 1)), jnp.ones((1, 37, 1)), scale=0.5,
                       chunk_size=16)
    np.testing.assert_allclose(o[0, :, 0], want, rtol=1e-10, atol=1e-10)


# (B, T, H, HV, K, V, C, dtype): T = 1, 63, 100 (ragged tails); GVA; K != V; chunk 16 and 64
CASES = [
    (1, 1, 1, 1, 16, 16, 64, jnp.float32),
    (2, 63, 2, 4, 32, 16, 16, jnp.float32),
    (1, 100, 1, 3, 24, 40, 64, jnp.bfloat16),
]


def _check_chunked(x, C, resets=None, label=""):
    (o_ref, S_ref, g_ref), (do, dS) = _oracle(x, resets)
    o, S, grads = value_and_grads(_chunked(C, resets), x, do, dS)
    assert o.dtype == x["v"].dtype, label
    assert_close(f"{label} o", o, o_ref, TOL["o"])
    assert_close(f"{label} state", S, S_ref, TOL["state"])
    for n in GRAD_NAMES:
        assert grads[n].dtype == x[n].dtype, f"{label} d{n}"
        assert_close(f"{label} d{n}", grads[n], g_ref[n], TOL[n])


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}H{}HV{}K{}V{}C{}-{}".format(*c[:7], c[7].__name__))
def test_chunked_matches_float64_recurrence(case):
    *dims, C, dtype = case
    _check_chunked(_inputs(*dims, dtype=dtype, seed=sum(dims)), C)


def test_gates_of_minus_1000_and_packed_documents_float32():
    T = 130
    x = _inputs(1, T, 2, 2, 32, 32, gate="strong", seed=4)
    _check_chunked(x, 64, resets_from_segment_ids(jnp.asarray(_segments(1, T, [30, 64, 65, 100]))))


def test_float64_is_exact_with_strong_gates_and_packed_documents():
    """In float64 the chunkwise form equals the recurrence to rounding, −1000 gates and
    boundaries inside chunks included; nothing is NaN."""
    T = 150
    x = {n: jnp.asarray(a, jnp.float64) for n, a in _inputs(2, T, 1, 2, 16, 8, gate="strong", seed=3).items()}
    resets = resets_from_segment_ids(jnp.asarray(_segments(2, T, [5, 37, 64, 65, 130])))
    (o_ref, S_ref, g_ref), (do, dS) = _oracle(x, resets)
    for C in (16, 64):
        o, S, grads = value_and_grads(_chunked(C, resets), x, do, dS)
        np.testing.assert_allclose(o, o_ref, atol=1e-10, rtol=1e-9, err_msg=f"C={C}")
        np.testing.assert_allclose(S, S_ref, atol=1e-10, rtol=1e-9, err_msg=f"C={C}")
        for n in GRAD_NAMES:
            assert np.isfinite(np.asarray(grads[n])).all(), n
            np.testing.assert_allclose(grads[n], g_ref[n], atol=1e-9, rtol=1e-8, err_msg=f"C={C} d{n}")


def test_packed_rows_equal_separate_documents():
    """Outputs of a packed row are those of each document run alone (the first one from h0), and
    the final state is the last document's."""
    T, bounds = 100, [1, 37, 64, 70]
    x = _inputs(1, T, 1, 2, 16, 8, seed=6)
    args = [x[n] for n in ("q", "k", "v", "g", "beta")]
    o, S = linear_attn(*args, initial_state=x["h0"], segment_ids=jnp.asarray(_segments(1, T, bounds)),
                       output_final_state=True, chunk_size=16)
    edges = [0, *bounds, T]
    for i, (a, b) in enumerate(zip(edges, edges[1:])):
        o_doc, S_doc = _numpy_loop(*(arr[:, a:b] for arr in args), 16**-0.5, x["h0"] if i == 0 else None)
        np.testing.assert_allclose(o[:, a:b], o_doc, rtol=1e-5, atol=1e-5, err_msg=f"document {i}")
    np.testing.assert_allclose(S, S_doc, rtol=1e-5, atol=1e-5)


def test_in_op_gate_and_its_parameter_gradients():
    """Raw gate + A_log/dt_bias, beta logits and q/k L2 norm: the values equal the loop on the
    hand-activated gate, and every gradient (incl. A_log, dt_bias) equals the loop's."""
    rng = np.random.default_rng(7)
    B, T, H, HV, K, V = 2, 70, 1, 2, 16, 8
    f64 = lambda *s: jnp.asarray(rng.standard_normal(s))
    args = dict(q=f64(B, T, H, K), k=f64(B, T, H, K), v=f64(B, T, HV, V), f=f64(B, T, HV), b=f64(B, T, HV),
                A_log=f64(HV) * 0.5, dt_bias=f64(HV), h0=f64(B, HV, K, V))
    seg = jnp.asarray(_segments(B, T, [20, 50]))

    def run(impl, a):
        o, S = linear_attn(a["q"], a["k"], a["v"], a["f"], a["b"], A_log=a["A_log"], dt_bias=a["dt_bias"],
                           beta_is_logit=True, use_qk_l2norm=True, initial_state=a["h0"], segment_ids=seg,
                           output_final_state=True, chunk_size=16, impl=impl)
        return o, S

    unit = lambda a: np.asarray(a) / np.sqrt(np.sum(np.asarray(a) ** 2, -1, keepdims=True) + 1e-6)
    g = -np.exp(np.asarray(args["A_log"])) * np.logaddexp(0.0, np.asarray(args["f"]) + np.asarray(args["dt_bias"]))
    beta = 1.0 / (1.0 + np.exp(-np.asarray(args["b"])))
    o_np, S_np = _numpy_loop(unit(args["q"]), unit(args["k"]), args["v"], g, beta, K**-0.5, args["h0"], np.asarray(seg))
    o, S = run("chunked", args)
    # the gate, the sigmoid and the initial state are float32 inside the op (inputs.canonicalize)
    np.testing.assert_allclose(o, o_np, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(S, S_np, rtol=1e-5, atol=1e-5)

    do, dS = cotangents(o.shape, S.shape, seed=3)
    loss = lambda a, impl: sum(jnp.sum(t * c) for t, c in zip(run(impl, a), (do, dS)))
    grad = jax.jit(jax.grad(loss), static_argnums=1)
    got, want = grad(args, "chunked"), grad(args, "reference")
    for n in args:
        assert np.abs(np.asarray(want[n])).max() > 0, n
        np.testing.assert_allclose(got[n], want[n], rtol=1e-6, atol=1e-6, err_msg=n)


def test_decode_continues_a_chunked_prefill():
    """One-token and few-token decode steps after a chunked prefill equal one pass of the loop."""
    T0, steps = 45, (1, 3, 1)
    x = _inputs(2, T0 + sum(steps), 1, 2, 16, 8, seed=8)
    args = [x[name] for name in ("q", "k", "v", "g", "beta")]
    o_full, S_full = linear_attn(*args, initial_state=x["h0"], output_final_state=True, impl="reference")
    o_pre, S = linear_attn(*(a[:, :T0] for a in args), initial_state=x["h0"], output_final_state=True, chunk_size=16)
    step = jax.jit(linear_attn_decode, donate_argnames="state")
    outs, t = [o_pre], T0
    for s in steps:
        o, S = step(*(a[:, t:t + s] for a in args), S)
        outs.append(o)
        t += s
    assert S.dtype == jnp.float32
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), o_full, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(S, S_full, rtol=1e-4, atol=1e-5)


def test_errors_name_the_problem():
    x = _inputs(1, 4, 1, 1, 8, 8)
    args = [x[n] for n in ("q", "k", "v", "g", "beta")]
    with pytest.raises(ValueError, match="impl must be one of"):
        linear_attn(*args, impl="mosaic")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        linear_attn(*args, chunk_size=0)
    with pytest.raises(ValueError, match=r"g must have shape \[B, T, HV\]"):
        linear_attn(*args[:3], jnp.zeros((1, 4, 1, 8)), args[4])
    with pytest.raises(ValueError, match="state must be a float32 array"):
        linear_attn_decode(*args, None)
