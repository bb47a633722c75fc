"""Chunked KDA with its serial passes on the Mosaic GPU kernels of ``state_pass``.

``kda_mosaic`` is ``kda_jax.ops.chunked.kda_chunked`` with ``passes=MosaicPasses()``: the
parallel-over-chunks algebra (gating, the exact diagonal sub-blocks, the triangular inverse,
W/U/Kd, outputs and the gradients that follow from the chunk states) is the same XLA code as
the ``chunked`` implementation, so the two share one backward; only the two recurrences over
the chunks (forward states and the reverse sweep of dS) run as kernels. Operands the kernels
read are rounded to bf16 (the state stays float32), so float32 inputs give bf16-level
agreement, within the thresholds of kda_spec §5.3.
"""

from __future__ import annotations

import jax.numpy as jnp

from kda_jax.kernels import state_pass
from kda_jax.ops.chunked import chunk_outputs, kda_chunked

_BF16, _F32 = jnp.bfloat16, jnp.float32
# ``output_pass`` (the forward state pass that also forms o) is checked in interpret mode only; the
# GPU-verified route (``forward_pass``, o in XLA) stays the default until its GPU tests pass.
FUSED_OUTPUT = False


class MosaicPasses:
    """The ``passes`` interface of ``kda_jax.ops.chunked`` on the state-pass kernels."""

    def __init__(self, interpret: bool = False, fused_output: bool | None = None):
        self.interpret = bool(interpret)
        self.fused_output = FUSED_OUTPUT if fused_output is None else bool(fused_output)

    def forward(self, W, U, Kd, gend, h0):
        return state_pass.forward_pass(W.astype(_BF16), U.astype(_BF16), Kd.astype(_BF16), gend.astype(_F32),
                                       h0.astype(_F32), interpret=self.interpret)

    def forward_output(self, W, U, Kd, gend, h0, Qs, Aqk, out_dtype):
        if not self.fused_output:
            h, Vn, S_T = self.forward(W, U, Kd, gend, h0)
            return chunk_outputs(Qs, Aqk, h, Vn), S_T
        out = jnp.bfloat16 if jnp.dtype(out_dtype) == jnp.dtype(_BF16) else _F32
        return state_pass.output_pass(W.astype(_BF16), U.astype(_BF16), Kd.astype(_BF16), gend.astype(_F32),
                                      h0.astype(_F32), Qs.astype(_BF16), Aqk.astype(_BF16), out_dtype=out,
                                      interpret=self.interpret)

    def reverse(self, dO, Aqk, Qs, Kd, W, gend, dS_T):
        dSn, dVn, dh0 = state_pass.reverse_pass(dO.astype(_BF16), Aqk.astype(_BF16), Qs.astype(_BF16),
                                                Kd.astype(_BF16), W.astype(_BF16), gend.astype(_F32),
                                                dS_T.astype(_F32), interpret=self.interpret)
        return dh0, dSn, dVn

    def _key(self):
        return (self.interpret, self.fused_output)

    def __hash__(self):
        return hash((type(self), self._key()))

    def __eq__(self, other):
        return type(self) is type(other) and self._key() == other._key()


def kda_mosaic(q, k, v, g, beta, *, scale, initial_state=None, resets=None, chunk_size=64, interpret=False,
               fused_output=None):
    """Canonical inputs (``kda_jax.ops.inputs.canonicalize``) -> (o, final state float32).

    Needs chunk_size 64 and K, V multiples of 64 (see ``supports``); ``interpret`` runs the
    kernels on CPU (tests); ``fused_output`` picks the forward kernel that also forms o
    (default ``FUSED_OUTPUT``).
    """
    return kda_chunked(q, k, v, g, beta, scale=scale, initial_state=initial_state, resets=resets,
                       chunk_size=chunk_size, passes=MosaicPasses(interpret, fused_output))
