"""The kernel-level contract of attention: ``softmax(q kᵀ · scale + mask) v``, forward and backward.

Every tier implements these two functions with this meaning (a CUDA tier through C++ ops
under the same schemas), registered as ``fusedops::attention_fwd_<tier>`` and
``fusedops::attention_bwd_<tier>`` custom ops with the fakes below. One pair serves both the
batched and the packed (varlen) layout, as FlashAttention's kernels do.

Layouts
  * batched (``cu_seqlens_q`` and ``cu_seqlens_k`` None): ``q`` ``(B, Hq, Sq, D)``, ``k`` and
    ``v`` ``(B, Hkv, Sk, D)``; ``max_seqlen_q`` and ``max_seqlen_k`` are ignored.
  * packed: ``q`` ``(Tq, Hq, D)``, ``k`` and ``v`` ``(Tk, Hkv, D)``; sequence ``b`` holds rows
    ``cu_seqlens_q[b] : cu_seqlens_q[b + 1]`` of ``q`` (int32, ``(batch + 1,)``, likewise for
    k and v), no sequence is longer than ``max_seqlen_q`` (``max_seqlen_k``).
  * ``Hq % Hkv == 0``: query head ``h`` reads key/value head ``h // (Hq // Hkv)`` (grouped and
    multi-query attention); K and V are never repeated in memory.
  * q, k, v (and ``grad_out``) have one dtype and any strides whose last one is 1.

Which keys a query sees. Within a sequence of ``Sq`` queries and ``Sk`` keys, query ``i``
sits at key position ``p = i + Sk - Sq`` (bottom-right alignment) and sees the keys ``j`` with
``p - window_left <= j <= p + window_right``. ``UNBOUNDED`` (2**30) on a side means no limit
there. Causal attention is ``window_right = 0``; torch's top-left causal alignment is
``window_right = Sq - Sk`` (negative when ``Sq < Sk``). A query that sees no key gets output
0 and lse ``-inf``, and passes no gradient.

``attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
window_left, window_right, allow_tf32) -> (out, lse)``

* ``out``: like ``q`` (``torch.empty_like``: a batched q stored ``(B, S, H, D)`` and viewed
  ``(B, H, S, D)`` gives an output with the same strides), in q's dtype, accumulated in
  float32 (float64 on the torch tier for float64 inputs).
* ``lse``: float32 natural log-sum-exp of the scaled scores, contiguous, ``(B, Hq, Sq)``
  batched and ``(Hq, Tq)`` packed (FlashAttention's layouts).
* ``allow_tf32``: float32 products may use tf32 tensor cores (decided the way torch decides
  for its matmuls).

``attention_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
max_seqlen_k, scale, window_left, window_right, allow_tf32, deterministic)
-> (grad_q, grad_k, grad_v)``

* ``out`` and ``lse`` are ``attention_fwd``'s; ``grad_out`` is shaped like ``out``.
* Each gradient is ``torch.empty_like`` its input; grad_k and grad_v of a grouped head sum
  over the query heads of its group.
* ``deterministic``: the gradients must be bitwise reproducible run to run (a tier whose
  backward always is may ignore it).

Malformed ``cu_seqlens`` (decreasing, past the tensor's end, a sequence longer than
``max_seqlen``) can only be seen with a host sync, so the kernels never check it: they
clamp every sequence to ``[0, T)``, never read or write out of bounds, and leave the rows of
such a sequence unspecified. ``FUSEDOPS_DEBUG=1`` (and CPU tensors) check it on the host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from fusedops.dispatch.contract import op_name

# A window side this large has no effect: no sequence is 2**30 tokens long, and key positions
# plus or minus it still fit the kernels' int32 arithmetic.
UNBOUNDED = 2 ** 30
HEAD_DIMS = (16, 32, 64, 96, 128, 256)  # what the kernels cover; other D run on the torch tier

SCHEMAS = {
    "attention_fwd": "(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, "
                     "Tensor? cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, "
                     "float scale, int window_left, int window_right, bool allow_tf32) "
                     "-> (Tensor, Tensor)",
    "attention_bwd": "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
                     "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, SymInt max_seqlen_q, "
                     "SymInt max_seqlen_k, float scale, int window_left, int window_right, "
                     "bool allow_tf32, bool deterministic) -> (Tensor, Tensor, Tensor)",
}


def is_packed(cu_seqlens_q: torch.Tensor | None) -> bool:
    return cu_seqlens_q is not None


def lse_shape(q: torch.Tensor, packed: bool) -> tuple[int, ...]:
    """``(B, Hq, Sq)`` batched, ``(Hq, Tq)`` packed."""
    if packed:
        return (q.shape[1], q.shape[0])
    return (q.shape[0], q.shape[1], q.shape[2])


def attention_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                       window_left, window_right, allow_tf32):
    lse = q.new_empty(lse_shape(q, is_packed(cu_seqlens_q)), dtype=torch.float32)
    return torch.empty_like(q), lse


def attention_bwd_fake(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                       max_seqlen_k, scale, window_left, window_right, allow_tf32,
                       deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class AttentionOps(NamedTuple):
    fwd: Callable
    bwd: Callable


def register_attention_ops(tier: str, fwd_impl: Callable, bwd_impl: Callable,
                           device_types: str | tuple[str, ...] | None = None) -> AttentionOps:
    """Wrap a tier's implementations (with the contract's signatures) as custom ops."""
    ops = []
    for op, impl, fake in (("attention_fwd", fwd_impl, attention_fwd_fake),
                           ("attention_bwd", bwd_impl, attention_bwd_fake)):
        custom = torch.library.custom_op(op_name(op, tier), impl, mutates_args=(),
                                         device_types=device_types, schema=SCHEMAS[op])
        custom.register_fake(fake)
        ops.append(custom)
    return AttentionOps(*ops)


def register_attention_fakes(tier: str) -> AttentionOps:
    """For ops defined in C++ (the CUDA tier): attach the fakes and return the op handles."""
    torch.library.register_fake(op_name("attention_fwd", tier))(attention_fwd_fake)
    torch.library.register_fake(op_name("attention_bwd", tier))(attention_bwd_fake)
    ops = torch.ops.fusedops
    return AttentionOps(getattr(ops, f"attention_fwd_{tier}").default,
                        getattr(ops, f"attention_bwd_{tier}").default)


__all__ = ["HEAD_DIMS", "SCHEMAS", "UNBOUNDED", "AttentionOps", "attention_bwd_fake",
           "attention_fwd_fake", "is_packed", "lse_shape", "register_attention_fakes",
           "register_attention_ops"]
