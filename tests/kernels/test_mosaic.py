"""The Mosaic GPU KDA kernels against the float64 recurrence: outputs, final state, all gradients.

CPU (default suite): the kernels in interpret mode at small shapes. GPU (``-m gpu``, run with
``KDA_TEST_GPU=1`` on the device machine): compiled, at the standard head size and awkward
shapes. Thresholds are kda_spec §5.3 (``tests.ops.helpers.TOL``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kda_jax.kernels import mosaic_supports, state_pass
from kda_jax.ops import chunked, kda, registry
from kda_jax.ops.inputs import resets_from_segment_ids
from tests.ops.helpers import GRAD_NAMES, check_against_oracle, make_inputs, rel_rmse

on_gpu = jax.default_backend() == "gpu"


def _mosaic(resets=None, interpret=True, **switches):
    """``kda_mosaic`` with its switches (``fused_output``, ``blocks_kernel``, ...; defaults where not named)."""
    from kda_jax.kernels.kda import kda_mosaic

    def fn(q, k, v, g, beta, h0):
        return kda_mosaic(q, k, v, g, beta, scale=q.shape[-1] ** -0.5, initial_state=h0, resets=resets,
                          interpret=interpret, **switches)
    return fn


def _segments(T, bounds):
    seg = np.zeros(T, np.int32)
    for b in bounds:
        seg[b:] += 1
    return seg


# ---------------------------------------------------------------------------------------------
# CPU, interpret mode


def _rand(shape, dtype, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@pytest.mark.parametrize("bv", [64, 32, 16])
def test_state_passes_equal_the_scan_passes(bv):
    """The three kernels, at each value-tile width, against ``ScanPasses`` on the same (bf16-rounded)
    chunk operands."""
    check_state_passes(bv, interpret=True, N=3, K=64)


def check_state_passes(bv, interpret, N, K):
    B, H, C, V = 1, 2, 64, 128
    W, U, Kd, dO, Qs = (_rand((N, B, H, C, d), jnp.bfloat16, s) * 0.2 for s, d in enumerate([K, V, K, V, K]))
    Aqk = jnp.tril(_rand((N, B, H, C, C), jnp.bfloat16, 7) * 0.1)
    gend = jnp.exp(-jnp.abs(_rand((N, B, H, K), jnp.float32, 8)))
    h0, dS_T = _rand((B, H, K, V), jnp.float32, 9), _rand((B, H, K, V), jnp.float32, 10)
    f32 = lambda *xs: [x.astype(jnp.float32) for x in xs]
    ref = chunked.SCAN.forward(*f32(W, U, Kd), gend, h0)
    got = state_pass.forward_pass(W, U, Kd, gend, h0, interpret=interpret, bv=bv)
    for name, a, b in zip(("h", "Vn", "S_T"), got, ref):
        assert rel_rmse(a, b) < 1e-2, name
    o_ref, S_ref = chunked.SCAN.forward_output(*f32(W, U, Kd), gend, h0, *f32(Qs, Aqk), jnp.float32)
    for out_dtype in (jnp.float32, jnp.bfloat16):
        o, S_T = state_pass.output_pass(W, U, Kd, gend, h0, Qs, Aqk, out_dtype=out_dtype, interpret=interpret, bv=bv)
        assert o.dtype == out_dtype
        assert rel_rmse(o, o_ref) < 1e-2 and rel_rmse(S_T, S_ref) < 1e-2, out_dtype
        # o written in the caller's layout [B, N·C, H, V] (``TIME_MAJOR``): the same bits
        o_tm, _ = state_pass.output_pass(W, U, Kd, gend, h0, Qs, Aqk, out_dtype=out_dtype, interpret=interpret, bv=bv,
                                         time_major=True)
        np.testing.assert_array_equal(np.asarray(o_tm), np.asarray(chunked._from_chunks(o)))
    dh0, dSn, dVn = chunked.SCAN.reverse(*f32(dO, Aqk, Qs, Kd, W), gend, dS_T)
    got = state_pass.reverse_pass(dO, Aqk, Qs, Kd, W, gend, dS_T, interpret=interpret, bv=bv)
    for name, a, b in zip(("dSn", "dVn", "dh0"), got, (dSn, dVn, dh0)):
        assert rel_rmse(a, b) < 1e-2, name


def test_state_pass_rejects_wrong_operands():
    W = jnp.zeros((1, 1, 1, 64, 64), jnp.bfloat16)
    g, h0 = jnp.ones((1, 1, 1, 64), jnp.float32), jnp.zeros((1, 1, 64, 64), jnp.float32)
    with pytest.raises(ValueError, match=r"U must be bfloat16\[1, 1, 1, 64, 64\], got float32"):
        state_pass.forward_pass(W, W.astype(jnp.float32), W, g, h0, interpret=True)
    W48 = jnp.zeros((1, 1, 1, 64, 48), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiples of 64"):
        state_pass.forward_pass(W48, W, W48, g[..., :48], jnp.zeros((1, 1, 48, 64), jnp.float32), interpret=True)
    with pytest.raises(ValueError, match=r"value tile in \(64, 32, 16\) dividing V; got C=64 K=64 V=64 tile=48"):
        state_pass.forward_pass(W, W, W, g, h0, interpret=True, bv=48)


@pytest.mark.parametrize("shape,dtype,gate,fused,blocks,factors", [
    # padding (T % 64 ≠ 0), h0; Aqk, L in XLA, the diagonal adjoints by ``band_adjoint``, G by XLA,
    # float32 operands for the XLA GEMMs
    ((1, 100, 1, 1, 64, 64), jnp.float32, "normal", False, False, False),
    ((1, 130, 1, 2, 64, 128), jnp.bfloat16, "strong", False, True, False),  # GVA, V = 128, gates of -1000
    ((1, 100, 1, 2, 64, 64), jnp.bfloat16, "strong", True, True, False),    # the fused-output forward kernel
    ((1, 130, 1, 2, 64, 128), jnp.float32, "strong", True, True, True),     # W, U, Kd, Qs by ``wy`` too
    ((1, 150, 1, 2, 64, 64), jnp.bfloat16, "mild", True, True, False),     # the state crosses whole chunks
], ids=["pad-f32-xla-blocks", "gva-bf16-strong", "fused-output", "factors-kernel", "mild-gates"])
def test_interpret_matches_float64_recurrence(shape, dtype, gate, fused, blocks, factors):
    x = make_inputs(*shape, dtype=dtype, gate=gate, seed=sum(shape))
    check_against_oracle(_mosaic(fused_output=fused, blocks_kernel=blocks, factors_kernel=factors,
                                 factored_adjoint=blocks, cumsum_kernel=blocks, bf16_operands=blocks), x,
                         label=f"mosaic {shape}", primal=fused)


@pytest.mark.parametrize("gate", ["normal", "strong"])
def test_interpret_factored_adjoint(gate):
    """The backward's diagonal adjoints by ``adjoint.diagonal_adjoint`` (``FACTORED_ADJOINT``): every row
    bounded (``normal``), or most rows through the exact bands (``strong``); GVA, padding, h0."""
    x = make_inputs(1, 150, 1, 2, 64, 64, dtype=jnp.bfloat16, gate=gate, seed=5)
    check_against_oracle(_mosaic(factored_adjoint=True), x, label=f"mosaic factored adjoint {gate}")


def check_gate_floor_kernel(shape, interpret):
    """g before the gate floor (−inf, −1000, exactly −200): the cumsum kernel's floor
    (``GATE_FLOOR_KERNEL``) gives the bits of XLA's, in o, the final state and every gradient."""
    x = make_inputs(*shape, dtype=jnp.bfloat16, gate="strong", seed=21)
    g = np.array(x["g"])
    g[0, 7, 0, :5], g[0, 50, 0, 10:20] = -np.inf, -200.0
    args = (x["q"], x["k"], x["v"], jnp.asarray(g), x["beta"], x["h0"])
    runs = []
    for on in (False, True):
        fn = _mosaic(interpret=interpret, gate_floor_kernel=on)
        loss = lambda *a: sum(jnp.sum(t.astype(jnp.float32) * jnp.cos(jnp.arange(t.size).reshape(t.shape)))
                              for t in fn(*a))
        runs.append((fn(*args), jax.grad(loss, argnums=range(6))(*args)))
    for name, a, b in zip(["o", "S_T", *GRAD_NAMES], [*runs[0][0], *runs[0][1]], [*runs[1][0], *runs[1][1]]):
        assert np.isfinite(np.asarray(a, np.float32)).all(), name
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_interpret_gate_floor_in_the_cumsum_kernel():
    check_gate_floor_kernel((1, 100, 1, 1, 64, 64), interpret=True)


def test_interpret_inverse_in_blocks():
    """T from ``gated_blocks``' epilogue (``INVERSE_IN_BLOCKS``) through the op against float64: outputs,
    final state and every gradient, both calls; GVA, padding, h0, −1000 gates."""
    x = make_inputs(1, 150, 1, 2, 64, 64, dtype=jnp.bfloat16, gate="strong", seed=6)
    check_against_oracle(_mosaic(fused_output=True, inverse_in_blocks=True), x, label="mosaic inverse in blocks",
                         primal=True)


@pytest.mark.parametrize("switches,gate", [
    pytest.param(dict(wy_adjoint_kernel=True), "strong", id="wy"),
    pytest.param(dict(inter_adjoint_kernel=True), "strong", id="inter"),
    pytest.param(dict(inter_adjoint_kernel=True), "mild", id="inter-mild"),
    pytest.param(dict(wy_adjoint_kernel=True, inter_adjoint_kernel=True), "mild", id="both", marks=pytest.mark.slow),
])
def test_interpret_backward_kernels(switches, gate):
    """The backward through W, U and the inverse by ``wy.wy_adjoint`` (``WY_ADJOINT_KERNEL``) and its parts
    through the chunk states by ``inter.inter_adjoint`` (``INTER_ADJOINT_KERNEL``) against float64:
    outputs, final state and every gradient; GVA, padding, h0; −1000 gates and documents with boundaries
    inside chunks and at a chunk's first row (``strong``), or one document with ``mild`` gates, so that
    the state carries across whole chunks and dg depends on it."""
    x = make_inputs(1, 150, 1, 2, 64, 64, dtype=jnp.bfloat16, gate=gate, seed=9)
    resets = None if gate == "mild" else resets_from_segment_ids(jnp.asarray(_segments(150, [10, 64, 71, 140])[None]))
    check_against_oracle(_mosaic(resets, **switches), x, resets=resets, label=f"mosaic {switches}")


@pytest.mark.parametrize("switches", [
    pytest.param({}, id="defaults"),
    # the paths that are off by default (suite budget: ``slow``; their GPU tests cover packed documents too)
    pytest.param(dict(blocks_kernel=False, factored_adjoint=False, cumsum_kernel=False, bf16_operands=False),
                 id="xla-chunk-pieces", marks=pytest.mark.slow),
    pytest.param(dict(factors_kernel=True), id="factors-kernel", marks=pytest.mark.slow),
])
def test_interpret_packed_documents(switches):
    """Documents with boundaries inside chunks (and at a chunk's first row), −1000 gates, both calls."""
    x = make_inputs(2, 150, 1, 1, 64, 64, dtype=jnp.bfloat16, gate="strong", seed=4)
    resets = resets_from_segment_ids(jnp.asarray(np.stack([_segments(150, [10, 70, 71]), _segments(150, [64, 140])])))
    check_against_oracle(_mosaic(resets, fused_output=True, **switches), x, resets=resets, label="mosaic segments",
                         primal=True)


def test_fused_output_only_where_not_differentiated(monkeypatch):
    """``fused_output`` forms o in the forward kernel for undifferentiated calls only; under a VJP the
    forward keeps ``forward_pass``, whose h and Vn the backward recomputes anyway."""
    calls = []
    for name in ("forward_pass", "output_pass"):
        real = getattr(state_pass, name)
        monkeypatch.setattr(state_pass, name, lambda *a, _f=real, _n=name, **kw: calls.append(_n) or _f(*a, **kw))
    x = make_inputs(1, 64, 1, 1, 128, 128, dtype=jnp.bfloat16, seed=3)
    args = [x[n] for n in GRAD_NAMES]
    fn = _mosaic(fused_output=True)
    jax.jit(fn).lower(*args)
    assert calls == ["output_pass"]
    calls.clear()
    jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)[0].astype(jnp.float32)), argnums=range(6))).lower(*args)
    assert calls == ["forward_pass", "forward_pass"]  # the forward, then the backward's recomputation
    calls.clear()
    jax.jit(_mosaic(fused_output=False)).lower(*args)
    assert calls == ["forward_pass"]


def test_fused_output_compiled_only_at_gpu_tested_head_sizes(monkeypatch):
    """Compiled (not interpret) calls take the fused-output kernel only at the (K, V) its GPU tests ran."""
    from kda_jax.kernels.kda import FUSED_OUTPUT_KV, MosaicPasses

    calls = []
    def output_pass(W, U, *a, time_major=False, **kw):  # o in the layout asked for
        calls.append("output_pass")
        N, B, H, C, V = U.shape
        return jnp.zeros((B, N * C, H, V) if time_major else (N, B, H, C, V)), jnp.zeros(a[2].shape)

    monkeypatch.setattr(state_pass, "output_pass", output_pass)
    monkeypatch.setattr(state_pass, "forward_pass", lambda W, U, Kd, gend, h0, **kw: calls.append("forward_pass") or
                        (jnp.zeros((*W.shape[:-2], W.shape[-1], U.shape[-1])), U, h0))
    for K, V in [(64, 64), (128, 64), (128, 128)]:
        N, B, H, C = 1, 1, 1, 64
        W, Kd, Qs = (jnp.zeros((N, B, H, C, K), jnp.bfloat16) for _ in range(3))
        U, Aqk = jnp.zeros((N, B, H, C, V), jnp.bfloat16), jnp.zeros((N, B, H, C, C), jnp.bfloat16)
        calls.clear()
        MosaicPasses(interpret=False, fused_output=True).forward_output_primal(
            W, U, Kd, jnp.ones((N, B, H, K)), jnp.zeros((B, H, K, V)), Qs, Aqk, jnp.bfloat16)
        assert calls == ["output_pass" if (K, V) in FUSED_OUTPUT_KV else "forward_pass"], (K, V)


def test_dispatch_is_fail_closed(monkeypatch):
    """The kernel refuses what the GPU tests do not cover, and ``auto`` never picks it on CPU."""
    call = lambda **kw: registry.Call(**{**dict(B=1, T=64, H=1, HV=1, K=128, V=128, qkv_dtype=jnp.dtype(jnp.bfloat16),
                                                chunk_size=64, has_segments=True, has_initial_state=True,
                                                backend="gpu"), **kw})
    assert mosaic_supports(call()) is None
    assert "GPU" in mosaic_supports(call(backend="cpu"))
    assert "no context mesh" in mosaic_supports(call(num_devices=8))
    assert mosaic_supports(call(sharded=True)) is None  # one shard of a mesh: GPU-tested on two H100s
    import kda_jax.kernels as kernels

    monkeypatch.setattr(kernels, "MOSAIC_SHARDED", False)
    assert "MOSAIC_SHARDED" in mosaic_supports(call(sharded=True))
    monkeypatch.undo()
    assert "chunk_size" in mosaic_supports(call(chunk_size=32))
    assert "K, V" in mosaic_supports(call(K=96))
    assert "K, V" in mosaic_supports(call(V=256))
    assert "K, V" in mosaic_supports(call(V=64))  # K ≠ V: not among the GPU-tested head sizes
    assert "float16" in mosaic_supports(call(qkv_dtype=jnp.dtype(jnp.float16)))
    assert registry.select("auto", call(backend="cpu")).name == "chunked"
    assert registry.select("auto", call(num_devices=2)).name == "chunked"
    assert registry.select("auto", call()).name == "mosaic"


# ---------------------------------------------------------------------------------------------
# GPU, compiled

GPU_SHAPES = [  # (B, T, H, HV, K, V)
    (2, 2048, 4, 4, 128, 128),
    (1, 63, 2, 2, 128, 128),
    (2, 1000, 2, 2, 64, 64),
    (1, 1500, 2, 4, 128, 128),  # GVA
    (1, 777, 3, 3, 64, 128),
]


@pytest.mark.gpu
def test_gpu_gate_floor_in_the_cumsum_kernel():
    """With test_cumsum_kernel.py's GPU tests and the ``gate_floor`` chunk-kernel tests, the condition for
    turning ``GATE_FLOOR_KERNEL`` on."""
    check_gate_floor_kernel((2, 1000, 2, 4, 128, 128), interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("bv", [64, 32, 16])
def test_gpu_state_passes_each_width(bv):
    """The compiled passes at each value-tile width they accept (``state_pass.BLOCK_V_CHOICES``)."""
    check_state_passes(bv, interpret=False, N=9, K=128)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "B{}T{}H{}HV{}K{}V{}".format(*s))
def test_gpu_matches_float64_recurrence(shape, dtype):
    x = make_inputs(*shape, dtype=dtype, seed=sum(shape))
    check_against_oracle(_mosaic(interpret=False), x, label=f"mosaic gpu {shape}", primal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [GPU_SHAPES[0], GPU_SHAPES[1], GPU_SHAPES[3]], ids=["T2048", "T63", "T1500-gva"])
def test_gpu_fused_output_matches_float64_recurrence(shape):
    """The forward kernel that forms o itself (``FUSED_OUTPUT``), before it becomes the default."""
    x = make_inputs(*shape, dtype=jnp.bfloat16, gate="strong", seed=sum(shape) + 1)
    check_against_oracle(_mosaic(interpret=False, fused_output=True), x, label=f"mosaic fused gpu {shape}",
                         primal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_gpu_fused_output_packed_documents_h0(dtype):
    """The fused-output forward on what its first GPU tests left out: float32, packed documents
    with boundaries inside chunks, h0, GVA, −1000 gates (the undifferentiated call and the VJP)."""
    T = 1000
    x = make_inputs(2, T, 2, 4, 128, 128, dtype=dtype, gate="strong", seed=61)
    resets = resets_from_segment_ids(jnp.asarray(np.stack([_segments(T, [1, 37, 64, 500, 999]),
                                                           _segments(T, [128, 640])])))
    check_against_oracle(_mosaic(resets, interpret=False, fused_output=True), x, resets=resets,
                         label=f"mosaic fused gpu packed {jnp.dtype(dtype).name}", primal=True)


# the chunk-parallel kernels: Aqk and L by ``blocks.gated_blocks`` (``BLOCKS_KERNEL``), and with them
# W, U, Kd, Qs by ``wy.forward_factors`` (``FACTORS_KERNEL``); name -> (switches, seed offset)
# the backward's diagonal adjoints by ``adjoint.diagonal_adjoint`` (``FACTORED_ADJOINT``) and G with the gate's
# gradient by ``cumsum.gate_cumsum`` (``CUMSUM_KERNEL``); the XLA GEMMs around the kernels on bf16 operands
# (``BF16_OPERANDS``); T in ``gated_blocks``' epilogue (``INVERSE_IN_BLOCKS``); the gate floor in the cumsum
# kernel (``GATE_FLOOR_KERNEL``); the diagonal sub-blocks as exact bands both ways (``band_lower``,
# ``band_adjoint``: ``BLOCKS_KERNEL`` and ``FACTORED_ADJOINT`` off); the backward through W, U and the inverse
# by ``wy.wy_adjoint`` (``WY_ADJOINT_KERNEL``); the parts through the chunk states by ``inter.inter_adjoint``
# (``INTER_ADJOINT_KERNEL``)
_CHUNK_KERNELS = {"blocks": (dict(blocks_kernel=True), 0), "factors": (dict(blocks_kernel=True, factors_kernel=True), 1),
                  "adjoint": (dict(factored_adjoint=True), 2), "cumsum": (dict(cumsum_kernel=True), 3),
                  "bf16_operands": (dict(bf16_operands=True), 4), "inverse": (dict(inverse_in_blocks=True), 5),
                  "gate_floor": (dict(gate_floor_kernel=True), 6),
                  "bands": (dict(blocks_kernel=False, factored_adjoint=False), 7),
                  "wy_adjoint": (dict(wy_adjoint_kernel=True), 8),
                  "inter_adjoint": (dict(inter_adjoint_kernel=True), 9)}


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", list(_CHUNK_KERNELS))
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "B{}T{}H{}HV{}K{}V{}".format(*s))
def test_gpu_chunk_kernels_match_float64_recurrence(shape, kernels):
    switches, off = _CHUNK_KERNELS[kernels]
    x = make_inputs(*shape, dtype=jnp.bfloat16, gate="strong", seed=sum(shape) + 2 + off)
    check_against_oracle(_mosaic(interpret=False, **switches), x, label=f"mosaic {kernels} gpu {shape}", primal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "B{}T{}H{}HV{}K{}V{}".format(*s))
def test_gpu_factored_adjoint_bounded_gates(shape):
    """``FACTORED_ADJOINT`` where every row is bounded (the band-free path in both directions)."""
    x = make_inputs(*shape, dtype=jnp.bfloat16, seed=sum(shape) + 5)
    check_against_oracle(_mosaic(interpret=False, factored_adjoint=True), x, label=f"mosaic factored adjoint gpu {shape}")


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", list(_CHUNK_KERNELS))
def test_gpu_chunk_kernels_packed_documents_f32(kernels):
    switches, off = _CHUNK_KERNELS[kernels]
    T = 1000
    x = make_inputs(2, T, 2, 4, 128, 128, dtype=jnp.float32, gate="strong", seed=71 + off)
    resets = resets_from_segment_ids(jnp.asarray(np.stack([_segments(T, [1, 37, 64, 500, 999]),
                                                           _segments(T, [128, 640])])))
    check_against_oracle(_mosaic(resets, interpret=False, **switches), x, resets=resets,
                         label=f"mosaic {kernels} gpu packed f32", primal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["defaults", "backward_kernels"])
def test_gpu_mild_gates(kernels):
    """``mild`` gates, one document per row: the state crosses whole chunks (e^{G_end} ~ 0.4), so o, the
    final state and dg depend on its decay, which ``normal`` and ``strong`` gates (~e^{-50} per chunk)
    leave near zero; with the defaults and with both backward kernels (``wy_adjoint``, ``inter_adjoint``)."""
    switches = dict(wy_adjoint_kernel=True, inter_adjoint_kernel=True) if kernels == "backward_kernels" else {}
    x = make_inputs(2, 2048, 4, 4, 128, 128, dtype=jnp.bfloat16, gate="mild", seed=33)
    check_against_oracle(_mosaic(interpret=False, **switches), x, label=f"mosaic gpu mild {kernels}", primal=True)


@pytest.mark.gpu
def test_gpu_strong_gates_packed_documents_front_door():
    """−1000 gates, documents with boundaries inside chunks, GVA and h0, through ``kda(impl="mosaic")``."""
    T = 1000
    x = make_inputs(2, T, 2, 4, 128, 128, dtype=jnp.bfloat16, gate="strong", seed=31)
    seg = jnp.asarray(np.stack([_segments(T, [1, 37, 64, 500, 999]), _segments(T, [128, 640])]))
    resets = resets_from_segment_ids(seg)
    check_against_oracle(
        lambda q, k, v, g, beta, h0: kda(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                         segment_ids=seg, impl="mosaic"),
        x, resets=resets, label="mosaic gpu packed")


@pytest.mark.gpu
@pytest.mark.parametrize("gate", ["strong", "normal"])
def test_gpu_causality(gate):
    """Changing inputs at t >= t0 changes neither outputs before t0 nor the gradients of inputs before t0
    (``normal``: every row before t0 bounded, and the chunk of t0 moves from the band-free path to the
    exact bands when the later gates become ``strong``, i.e. unbounded; ``strong``: mostly the bands)."""
    T, t0 = 1000, 300
    x = make_inputs(1, T, 2, 2, 128, 128, dtype=jnp.bfloat16, gate=gate, seed=41)
    y = make_inputs(1, T, 2, 2, 128, 128, dtype=jnp.bfloat16, gate="strong", seed=42)
    mixed = {n: (x[n] if n == "h0" else x[n].at[:, t0:].set(y[n][:, t0:])) for n in GRAD_NAMES}
    do = jnp.asarray(np.random.default_rng(0).standard_normal((1, t0, 2, 128)), jnp.float32)
    fn = _mosaic(interpret=False)

    def prefix(inp):
        def loss(*args):
            o, _ = fn(*args)
            return jnp.sum(o[:, :t0].astype(jnp.float32) * do), o
        return jax.grad(loss, argnums=range(6), has_aux=True)(*(inp[n] for n in GRAD_NAMES))

    g1, o1 = prefix(x)
    g2, o2 = prefix(mixed)
    np.testing.assert_array_equal(np.asarray(o1[:, :t0], np.float32), np.asarray(o2[:, :t0], np.float32))
    for n, a, b in zip(GRAD_NAMES, g1, g2):
        if n == "h0":
            continue
        np.testing.assert_array_equal(np.asarray(a[:, :t0], np.float32), np.asarray(b[:, :t0], np.float32), err_msg=n)
        assert not np.any(np.asarray(a[:, t0 + 64:], np.float32)), f"d{n} nonzero after t0"


@pytest.mark.gpu
@pytest.mark.multi_gpu
@pytest.mark.skipif(jax.device_count() < 2, reason="needs two GPUs (device kind nvidia-h100-x2)")
def test_gpu_sharded_matches_float64_recurrence(monkeypatch):
    """The kernels per shard under a two-GPU mesh (``kda_jax.ops.sharded``: batch rows over ``data``,
    then heads over ``tensor``): outputs, final state and all gradients against the float64
    recurrence, −1000 gates, documents, GVA, h0. The condition for turning ``MOSAIC_SHARDED`` on."""
    from jax.sharding import AxisType

    import kda_jax.kernels as kernels
    from kda_jax.models.sharding import MESH_AXES

    monkeypatch.setattr(kernels, "MOSAIC_SHARDED", True)
    T = 1000
    x = make_inputs(2, T, 2, 4, 128, 128, dtype=jnp.bfloat16, gate="strong", seed=51)
    seg = jnp.asarray(np.stack([_segments(T, [1, 300]), _segments(T, [64, 999])]))
    resets = resets_from_segment_ids(seg)
    fn = lambda q, k, v, g, beta, h0: kda(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                          segment_ids=seg, impl="mosaic")
    for shape in ((2, 1, 1, 1), (1, 1, 2, 1)):
        mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 4, devices=jax.devices()[:2])
        with jax.set_mesh(mesh):
            text = jax.jit(lambda *a: kda(*a, impl="mosaic")[0]).lower(*(x[n] for n in GRAD_NAMES[:5])).as_text()
            assert "mosaic_gpu" in text and "manual_computation" in text, "the kernels did not run per shard"
            check_against_oracle(fn, x, resets=resets, label=f"mosaic gpu sharded {shape}")
