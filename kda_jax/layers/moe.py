"""The routed mixture-of-experts block of Kimi Linear / DeepSeek-V3 (kimi_linear_model §1.5, §2.4).

Router (always float32: x and the router kernel are cast up, so routing decisions do not
depend on the compute dtype): ``s = sigmoid(x W_gate)``; the top-k experts of
``s + e_score_correction_bias`` are selected; their weights are

- ``router_bias_in_weights=False`` (default): the unbiased scores ``s`` at the selected experts —
  the intended aux-loss-free design (bias for selection only), as vLLM and transformers 5.24 do;
- ``router_bias_in_weights=True``: the biased scores ``s + bias``, which reproduces the released
  HF remote code (it adds the bias in place on a view of the scores; design doc §9 item 4);

then, if ``renormalize``, divided by their sum (+1e-20), and multiplied by ``routed_scaling_factor``.
``y = sum_k w_k Expert_k(x) + Shared(x)``, every expert a SwiGLU ``(silu(x W1) * x W3) W2``
whose matmuls run in ``dtype`` with float32 accumulation; the weighted sum is float32.

Dispatch:

- ``"sorted"`` (default, dropless): the N*K (token, expert) assignments are sorted by expert,
  the tokens gathered into that order (each expert's group padded to a block multiple), the
  three expert matmuls run as ``grouped_matmul`` (block-wise forward and gradients over that
  buffer: ``grouped.py``), and the results un-sorted and summed over k with the routing weights.
  When N*K <= E (decoding a few sequences) each assignment gathers its own expert's weights
  instead (``gathered_experts``: reads N*K expert matrices, not one per buffer block).
- ``"dense"``: every expert on every token, weighted by the sparse [N, E] routing matrix —
  O(N E F) work, the reference the sorted path is tested against.

Expert parallelism: under a mesh (``jax.set_mesh``) whose ``expert`` axis has n > 1 devices, the
sorted path runs in a ``shard_map`` manual over every mesh axis. Each ``expert`` shard holds E/n
experts' weights (and F/t of their width over ``tensor``, when t divides F) and sees the same
tokens: its data-parallel slice of N, split over the remaining (batch) axes. Assignments to
other shards' experts are dropped from the buffer (outputs zeroed), so each matmul fills only
the local groups, and a ``psum`` over ``expert`` (and ``tensor``) adds the partial outputs. Cost:
no all-to-all; every expert shard sorts and buffers all N_local*K assignments of its token slice
(the buffer is sized for all of them), and one all-reduce of the [N_local, D] float32 output.

Balancing: ``e_score_correction_bias`` is a ``RouterBias`` variable, not an ``nnx.Param``, so
optimisers leave it alone; ``MoE.update_bias`` applies the DeepSeek-V3 sign update
(``balance_bias``) from the ``load`` the block reports. An optional sequence-level balance loss
(``seq_aux_loss_coef``) is returned in ``MoEStats``; padding tokens never enter the statistics.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import PartitionSpec as P

from kda_jax.layers.common import GEMM_ROWS, Linear, default_kernel_init, param, widened
from kda_jax.layers.grouped import aligned_layout, buffer_rows, grouped_matmul
from kda_jax.layers.mlp import SwiGLU

DISPATCHES = ("sorted", "dense")


class RouterBias(nnx.Variable):
    """The aux-loss-free correction bias: module state and checkpointed, but not trained by gradients."""


@struct.dataclass
class MoEStats:
    load: jax.Array           # [E] fraction of valid tokens' assignments per expert (sums to 1)
    aux_loss: jax.Array       # [] seq_aux_loss_coef * sequence-level balance loss
    max_violation: jax.Array  # [] max(load) / mean(load) - 1


def balance_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """DeepSeek-V3 aux-loss-free update: raise the bias of under-loaded experts, lower the others'."""
    load = jax.lax.stop_gradient(load)
    return bias + rate * jnp.sign(jnp.mean(load) - load).astype(bias.dtype)


def route(x_ND, kernel_DE, bias_E, top_k: int, *, renormalize: bool, scale: float, bias_in_weights: bool):
    """Float32 sigmoid router: returns ``(scores [N, E], expert ids [N, K], weights [N, K])``."""
    logits_NE = jnp.dot(widened(x_ND.astype(jnp.float32)), kernel_DE.astype(jnp.float32))[:x_ND.shape[0]]
    scores_NE = jax.nn.sigmoid(logits_NE)
    biased_NE = scores_NE + jax.lax.stop_gradient(bias_E.astype(jnp.float32))
    _, idx_NK = jax.lax.top_k(jax.lax.stop_gradient(biased_NE), top_k)
    w_NK = jnp.take_along_axis(biased_NE if bias_in_weights else scores_NE, idx_NK, axis=-1)
    if renormalize:
        w_NK = w_NK / (jnp.sum(w_NK, axis=-1, keepdims=True) + 1e-20)
    return scores_NE, idx_NK, w_NK * scale


def _glu(h1, h3, dtype):
    return (jax.nn.silu(h1) * h3).astype(dtype)


def dense_experts(x_ND, idx_NK, w_NK, w1_EDF, w3_EDF, w2_EFD, dtype):
    """Every expert on every token, combined with the sparse routing matrix (the reference path)."""
    combine_NE = jnp.einsum("nke,nk->ne", jax.nn.one_hot(idx_NK, w1_EDF.shape[0], dtype=jnp.float32), w_NK)
    x_ND = x_ND.astype(dtype)
    mm = dict(preferred_element_type=jnp.float32)
    h1_NEF = jnp.einsum("nd,edf->nef", x_ND, w1_EDF.astype(dtype), **mm)
    h3_NEF = jnp.einsum("nd,edf->nef", x_ND, w3_EDF.astype(dtype), **mm)
    out_NED = jnp.einsum("nef,efd->ned", _glu(h1_NEF, h3_NEF, dtype), w2_EFD.astype(dtype), **mm)
    return jnp.einsum("ned,ne->nd", out_NED, combine_NE)


# Matmul flops an accelerator does in the time it reads one byte (H100 bf16: ~990 TFLOP/s over
# ~3.35 TB/s); weighs a block's weight read against its padding rows in ``_block_rows``.
_FLOPS_PER_BYTE = 256


def _block_rows(M: int, E: int) -> int:
    """Rows per expert block of the aligned buffer, a power of two in [8, 128], minimising
    compute + weight traffic: ``L`` buffer rows cost ``2 L`` flops per weight element, and each
    of the ``L / block`` blocks reads its expert's matrix (2 bytes per element). Small blocks
    waste fewer padding rows, large ones read the weights less often (decode-sized batches)."""
    def cost(block):
        L = buffer_rows(M, E, block)
        return 2 * L + _FLOPS_PER_BYTE * 2 * (L // block)

    return min((8, 16, 32, 64, 128), key=cost)


def _row_products(a_MX, e_M, ws, dtype):
    """``[len(ws), M, Y]`` float32, entry ``[j, m]`` = ``a[m] @ ws[j][e[m]]`` in ``dtype``. On a GPU
    the gathered-expert kernel reads each selected matrix in place (``kda_jax.kernels.gathered``,
    where ``gathered_supports`` accepts the call); otherwise XLA gathers the M matrices and
    multiplies each as a ``GEMM_ROWS``-row GEMM of identical rows (``common.GEMM_ROWS`` says why)."""
    from kda_jax import kernels

    (M, X), Y = a_MX.shape, ws[0].shape[-1]
    a_MX = a_MX.astype(dtype)
    why = kernels.gathered_supports(M, X, Y, a_MX.dtype, ws[0].dtype, jax.default_backend(), jax.device_count())
    if kernels.GATHERED_AUTO and why is None and all(w.dtype == ws[0].dtype for w in ws):
        from kda_jax.kernels.gathered import expert_rows

        return expert_rows(a_MX, e_M, tuple(ws))
    a_MRX = jnp.broadcast_to(a_MX[:, None, :], (M, GEMM_ROWS, X))
    return jnp.stack([jnp.einsum("mrx,mxy->mry", a_MRX, w[e_M].astype(dtype), preferred_element_type=jnp.float32)[:, 0]
                      for w in ws])


def gathered_experts(x_ND, idx_NK, w_NK, w1_EDF, w3_EDF, w2_EFD, dtype, first_expert=0):
    """Each assignment multiplies its own expert's weights (``_row_products``): reads exactly
    ``N * K`` expert matrices, the least possible when there are fewer assignments than experts
    (decoding a few sequences). Assignments to experts outside ``first_expert .. first_expert + E``
    contribute zero."""
    E = w1_EDF.shape[0]
    N, K = idx_NK.shape
    local_NK = idx_NK - first_expert
    live_NK = (local_NK >= 0) & (local_NK < E)
    e_M = jnp.clip(local_NK, 0, E - 1).reshape(-1)  # M = N * K assignments, token-major
    h1_MF, h3_MF = _row_products(jnp.repeat(x_ND, K, axis=0), e_M, (w1_EDF, w3_EDF), dtype)
    (out_MD,) = _row_products(_glu(h1_MF, h3_MF, dtype), e_M, (w2_EFD,), dtype)
    return jnp.einsum("nkd,nk->nd", out_MD.reshape(N, K, -1), jnp.where(live_NK, w_NK, 0.0))


def sorted_experts(x_ND, idx_NK, w_NK, w1_EDF, w3_EDF, w2_EFD, dtype, first_expert=0):
    """Dropless sort + grouped-matmul dispatch over the experts ``first_expert .. first_expert + E``.

    The assignments are laid out expert by expert in a block-aligned buffer (``grouped.py``) so the
    weight gradients stay ``[E, D, F]``-sized; assignments to experts outside the range are
    dropped and contribute zero. With no more assignments than experts (decode) the buffer's
    per-block weight reads would exceed the ``N * K`` matrices needed: ``gathered_experts`` instead.
    """
    (N, K), E = idx_NK.shape, w1_EDF.shape[0]
    if N * K <= E:
        return gathered_experts(x_ND, idx_NK, w_NK, w1_EDF, w3_EDF, w2_EFD, dtype, first_expert)
    local_M = idx_NK.reshape(-1) - first_expert  # M = N * K assignments, token-major
    group_M = jnp.where((local_M >= 0) & (local_M < E), local_M, E).astype(jnp.int32)
    layout = aligned_layout(group_M, E, _block_rows(N * K, E))
    x_ND = jnp.concatenate([x_ND.astype(dtype), jnp.zeros((1, x_ND.shape[1]), dtype)])  # row N: padding
    xs_LD = x_ND[jnp.minimum(layout.src_L // K, N)]
    mm = dict(sizes_E=layout.sizes_E, block_expert=layout.block_expert)
    h1_LF = grouped_matmul(xs_LD, w1_EDF.astype(dtype), **mm)
    h3_LF = grouped_matmul(xs_LD, w3_EDF.astype(dtype), **mm)
    out_LD = grouped_matmul(_glu(h1_LF, h3_LF, dtype), w2_EFD.astype(dtype), **mm)
    out_MD = jnp.take(out_LD, layout.dest_M, axis=0, mode="fill", fill_value=0.0)  # un-sort; dropped -> 0
    return jnp.einsum("nkd,nk->nd", out_MD.reshape(N, K, -1), w_NK)


# Always traced (jit), so shard_map never runs eagerly; the mesh is a static argument.
@functools.partial(jax.jit, static_argnames=("dtype", "mesh"))
def expert_parallel(x_ND, idx_NK, w_NK, w1_EDF, w3_EDF, w2_EFD, dtype, mesh):
    """``sorted_experts`` under ``mesh``: experts split over ``expert`` (see the module doc).

    Manual over every mesh axis: tokens split over the axes other than ``expert`` and ``tensor``
    (the batch axes) when they divide N, the expert width F over ``tensor`` when it divides F.
    """
    (N, _), (E, _, F) = x_ND.shape, w1_EDF.shape
    n_exp = mesh.shape["expert"]
    if E % n_exp:
        raise ValueError(f"num_experts={E} is not divisible by the mesh 'expert' axis size {n_exp}")
    batch = tuple(a for a in mesh.axis_names if a not in ("expert", "tensor"))
    batch = batch if batch and N % math.prod(mesh.shape[a] for a in batch) == 0 else None
    tensor = "tensor" if "tensor" in mesh.axis_names and F % mesh.shape["tensor"] == 0 else None
    reduce_axes = ("expert", tensor) if tensor else "expert"

    def shard(x_ND, idx_NK, w_NK, w1, w3, w2):
        first = jax.lax.axis_index("expert") * (E // n_exp)
        return jax.lax.psum(sorted_experts(x_ND, idx_NK, w_NK, w1, w3, w2, dtype, first), reduce_axes)

    # check_vma=False: in jax 0.11 a multi-operand sort (argsort) marks its index output as
    # replicated over 'expert' although it varies, which makes the x-gradient wrong.
    tok, up, down = P(batch), P("expert", None, tensor), P("expert", tensor, None)
    return jax.shard_map(shard, mesh=mesh, in_specs=(tok, tok, tok, up, up, down), out_specs=tok,
                         check_vma=False)(x_ND, idx_NK, w_NK, w1_EDF, w3_EDF, w2_EFD)


def routing_stats(scores_BTE, idx_BTK, mask_BT, aux_coef: float) -> MoEStats:
    """Load per expert and the DeepSeek-V3 sequence-level balance loss over valid tokens."""
    K, E = idx_BTK.shape[-1], scores_BTE.shape[-1]
    mask_BT = mask_BT.astype(jnp.float32)
    chosen_BTE = jnp.sum(jax.nn.one_hot(idx_BTK, E, dtype=jnp.float32), axis=2) * mask_BT[..., None]
    load_E = jnp.sum(chosen_BTE, axis=(0, 1)) / (K * jnp.maximum(jnp.sum(mask_BT), 1.0))
    aux = jnp.zeros((), jnp.float32)
    if aux_coef:
        valid_B = jnp.sum(mask_BT, axis=1)
        f_BE = E / (K * jnp.maximum(valid_B, 1.0))[:, None] * jnp.sum(chosen_BTE, axis=1)
        s_BTE = scores_BTE / jnp.sum(scores_BTE, axis=-1, keepdims=True)
        p_BE = jnp.einsum("bte,bt->be", s_BTE, mask_BT) / jnp.maximum(valid_B, 1.0)[:, None]
        loss_B = jnp.sum(jax.lax.stop_gradient(f_BE) * p_BE, axis=-1)
        has_tokens_B = (valid_B > 0).astype(jnp.float32)  # fully padded rows do not dilute the mean
        aux = aux_coef * jnp.sum(loss_B * has_tokens_B) / jnp.maximum(jnp.sum(has_tokens_B), 1.0)
    return MoEStats(load=load_E, aux_loss=aux, max_violation=E * jnp.max(load_E) - 1.0)


def _expert_mesh():
    """The context mesh if it has an ``expert`` axis of size > 1, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.shape.get("expert", 1) == 1 else mesh


class MoE(nnx.Module):
    """Sigmoid-routed top-k MoE with shared experts; parameter names follow the HF checkpoint."""

    def __init__(self, hidden: int, *, num_experts: int, top_k: int, expert_dim: int, num_shared_experts: int,
                 routed_scaling_factor: float, renormalize: bool = True, router_bias_in_weights: bool = False,
                 seq_aux_loss_coef: float = 0.0, dispatch: str = "sorted", rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        if dispatch not in DISPATCHES:
            raise ValueError(f"MoE dispatch must be one of {DISPATCHES}, got {dispatch!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"MoE needs 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
        if num_shared_experts < 0 or expert_dim < 1:
            raise ValueError(f"bad MoE sizes: expert_dim={expert_dim}, num_shared_experts={num_shared_experts}")
        self.hidden, self.num_experts, self.top_k, self.expert_dim = hidden, num_experts, top_k, expert_dim
        self.routed_scaling_factor, self.renormalize = routed_scaling_factor, renormalize
        self.router_bias_in_weights, self.seq_aux_loss_coef = router_bias_in_weights, seq_aux_loss_coef
        self.dispatch, self.dtype = dispatch, dtype
        E, D, F = num_experts, hidden, expert_dim
        self.gate = Linear(D, E, ("embed", None), rngs=rngs, param_dtype=param_dtype)
        self.e_score_correction_bias = RouterBias(jnp.zeros((E,), jnp.float32), out_sharding=(None,),
                                                  eager_sharding=False)
        init = default_kernel_init
        self.w1 = param(rngs, init, (E, D, F), ("expert", "embed", "expert_mlp"), dtype=param_dtype)
        self.w3 = param(rngs, init, (E, D, F), ("expert", "embed", "expert_mlp"), dtype=param_dtype)
        self.w2 = param(rngs, init, (E, F, D), ("expert", "expert_mlp", "embed"), dtype=param_dtype)
        self.shared_experts = (SwiGLU(D, num_shared_experts * F, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                               if num_shared_experts else None)

    def __call__(self, x_BTD: jax.Array, token_mask: jax.Array | None = None) -> tuple[jax.Array, MoEStats]:
        if x_BTD.ndim != 3 or x_BTD.shape[-1] != self.hidden:
            raise ValueError(f"MoE expects x of shape [B, T, {self.hidden}], got {x_BTD.shape}")
        B, T, D = x_BTD.shape
        if token_mask is None:
            token_mask = jnp.ones((B, T), bool)
        elif token_mask.shape != (B, T):
            raise ValueError(f"token_mask must have shape {(B, T)}, got {token_mask.shape}")
        x_ND = x_BTD.reshape(B * T, D)
        scores_NE, idx_NK, w_NK = route(
            x_ND, self.gate.kernel[...], self.e_score_correction_bias[...], self.top_k,
            renormalize=self.renormalize, scale=self.routed_scaling_factor, bias_in_weights=self.router_bias_in_weights)
        experts = (self.w1[...], self.w3[...], self.w2[...])
        mesh = _expert_mesh()
        if self.dispatch == "dense":
            y_ND = dense_experts(x_ND, idx_NK, w_NK, *experts, self.dtype)
        elif mesh is not None:
            y_ND = expert_parallel(x_ND, idx_NK, w_NK, *experts, self.dtype, mesh)
        else:
            y_ND = sorted_experts(x_ND, idx_NK, w_NK, *experts, self.dtype)
        y_BTD = y_ND.reshape(B, T, D)
        if self.shared_experts is not None:
            y_BTD = y_BTD + self.shared_experts(x_BTD)
        stats = routing_stats(scores_NE.reshape(B, T, -1), idx_NK.reshape(B, T, -1), token_mask,
                              self.seq_aux_loss_coef)
        return y_BTD.astype(x_BTD.dtype), stats

    def update_bias(self, load: jax.Array, rate: float) -> None:
        """Apply ``balance_bias`` to ``e_score_correction_bias`` (call once per step, outside the gradient)."""
        self.e_score_correction_bias[...] = balance_bias(self.e_score_correction_bias[...], load, rate)
