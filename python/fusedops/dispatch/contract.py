"""The kernel-level contract every tier implements, and its torch custom-op plumbing.

Each tier module (``torch_ref``, ``triton``, ``cuda``) exposes the same functions with the
same meaning, so ``ops/`` can call whichever tier ``select`` returns. This file states the
contract once and holds what is shared by all tiers: the fake (shape) implementations that
let ``torch.compile`` trace through the ops, and ``register_tier_ops`` that turns a tier's
plain Python implementations into ``fusedops::<op>_<tier>`` custom ops.

Softmax-cross-entropy with class-index targets
----------------------------------------------
``ce_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap)
-> (loss, lse)``

* ``logits``: ``(N, C)``, float16 / bfloat16 / float32 (the torch tier also float64), the
  class dimension contiguous (``stride(1) == 1``), any row stride.
* ``target``: ``(N,)`` int64 or int32 class indices.
* ``weight``: ``(C,)`` float32 contiguous class weights, or ``None`` (all ones).
* ``softcap``: ``0.0`` for none, else logits become ``softcap * tanh(logits / softcap)``
  (call the result ``z``) before anything else.
* ``loss``: ``(N,)`` in the accumulation dtype (float32; float64 for float64 logits), the
  row's loss before reduction::

      lse = log(sum_c exp(z_c))
      loss = w[t] * ((1 - eps) * (lse - z_t) + z_loss * lse**2)
             + eps / C * sum_c w[c] * (lse - z_c)

  0 for rows whose target is ``ignore_index``; NaN for a target outside ``[0, C)`` that is
  not ``ignore_index`` (the kernels never read out of bounds for it).
* ``lse``: ``(N,)`` accumulation dtype, the log-sum-exp of ``z`` for every row. It is the
  only thing the forward saves for backward besides its inputs.

``ce_bwd(logits, target, weight, lse, grad_loss, ignore_index, label_smoothing, z_loss,
softcap, inplace) -> grad_logits``

* ``grad_loss``: ``(N,)`` accumulation dtype, contiguous: d(result)/d(loss_i), the reduction
  already folded in (``g / denominator`` for "mean", ``g`` for "sum", ``g_i`` for "none").
* Returns ``(N, C)`` in the dtype of ``logits``; with ``p = exp(z - lse)``::

      dloss/dz_c = w[t] * ((1 - eps) * (p_c - [c == t]) + 2 * z_loss * lse * p_c)
                   + eps / C * (sum(w) * p_c - w[c])
      dloss/dlogits_c = dloss/dz_c * (1 - (z_c / softcap)**2)    (with softcap)

  times ``grad_loss[i]``; 0 for ignored rows, NaN for out-of-range targets.
* ``inplace=True`` writes the gradient over ``logits``' storage and returns ``logits``;
  otherwise ``logits`` is never written. Backward reads the logits once and writes the
  gradient once; no float32 copy of the logits is ever made.

Probability targets (torch tier only): ``ce_probs_fwd`` / ``ce_probs_bwd`` in ``torch_ref``.

Custom ops
----------
Per tier: ``fusedops::ce_fwd_<tier>``, ``fusedops::ce_bwd_<tier>`` (returns a new tensor) and
``fusedops::ce_bwd_inplace_<tier>`` (mutates ``logits``, returns nothing). The CUDA tier
defines its ops in C++ (``TORCH_LIBRARY``) and only registers the fakes here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import NamedTuple

import torch

NAMESPACE = "fusedops"

# The test suite sets this variable so that every output a tier allocates starts as NaN: an
# element a kernel forgets to write then fails the comparison instead of passing on whatever
# the memory held. The CUDA tier's C++ allocations read the same variable.
POISON_ENV_VAR = "FUSEDOPS_POISON_OUTPUTS"


def poisoning() -> bool:
    """Whether outputs are NaN-filled before a launch (FUSEDOPS_POISON_OUTPUTS=1, the tests)."""
    return os.environ.get(POISON_ENV_VAR) == "1"


def new_output(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised output tensor (NaN-filled when FUSEDOPS_POISON_OUTPUTS=1)."""
    if os.environ.get(POISON_ENV_VAR) == "1":
        return torch.full(shape, math.nan, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def new_output_like(like: torch.Tensor, **kwargs) -> torch.Tensor:
    """``torch.empty_like(like, **kwargs)`` (strides kept), NaN-filled like ``new_output``."""
    out = torch.empty_like(like, **kwargs)
    if os.environ.get(POISON_ENV_VAR) == "1":
        out.fill_(math.nan)
    return out


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_targets_in_range(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise ValueError for a class outside [0, C) that is not ignore_index (a host sync)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise ValueError(f"fusedops.cross_entropy: target contains class {value}, outside "
                         f"[0, {num_classes}) and not ignore_index={ignore_index}")


# --- fake (meta) implementations: shapes and dtypes only --------------------------------


def ce_fwd_fake(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap):
    rows = logits.shape[0]
    acc = accumulation_dtype(logits.dtype)
    return logits.new_empty((rows,), dtype=acc), logits.new_empty((rows,), dtype=acc)


def ce_bwd_fake(logits, target, weight, lse, grad_loss, ignore_index, label_smoothing, z_loss,
                softcap):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def ce_bwd_inplace_fake(logits, target, weight, lse, grad_loss, ignore_index, label_smoothing,
                        z_loss, softcap):
    return None


class CrossEntropyOps(NamedTuple):
    """A tier's cross-entropy custom ops (``torch._ops.OpOverload``-like callables)."""

    fwd: Callable
    bwd: Callable
    bwd_inplace: Callable


# The schemas, shared with the C++ TORCH_LIBRARY definitions of the CUDA tier (bindings.cpp).
SCHEMAS = {
    "ce_fwd": "(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
              "float label_smoothing, float z_loss, float softcap) -> (Tensor, Tensor)",
    "ce_bwd": "(Tensor logits, Tensor target, Tensor? weight, Tensor lse, Tensor grad_loss, "
              "int ignore_index, float label_smoothing, float z_loss, float softcap) -> Tensor",
    "ce_bwd_inplace": "(Tensor(a!) logits, Tensor target, Tensor? weight, Tensor lse, "
                      "Tensor grad_loss, int ignore_index, float label_smoothing, float z_loss, "
                      "float softcap) -> ()",
}


def op_name(op: str, tier: str) -> str:
    return f"{NAMESPACE}::{op}_{tier}"


def register_cross_entropy_ops(tier: str, fwd_impl: Callable, bwd_impl: Callable,
                               device_types: str | tuple[str, ...] | None = None
                               ) -> CrossEntropyOps:
    """Wrap a tier's Python implementations as ``fusedops::ce_*_<tier>`` custom ops.

    ``fwd_impl`` has ``ce_fwd``'s signature; ``bwd_impl(..., out)`` writes the gradient into
    ``out`` (a fresh tensor or ``logits`` itself for the in-place op) and returns nothing.
    """
    def define(op, impl, mutates_args=()):
        return torch.library.custom_op(op_name(op, tier), impl, mutates_args=mutates_args,
                                       device_types=device_types,
                                       schema=SCHEMAS[op])

    def bwd_out_of_place(logits, target, weight, lse, grad_loss, ignore_index, label_smoothing,
                         z_loss, softcap):
        out = new_output(logits.shape, dtype=logits.dtype, device=logits.device)
        bwd_impl(logits, target, weight, lse, grad_loss, ignore_index, label_smoothing, z_loss,
                 softcap, out)
        return out

    def bwd_inplace(logits, target, weight, lse, grad_loss, ignore_index, label_smoothing,
                    z_loss, softcap):
        bwd_impl(logits, target, weight, lse, grad_loss, ignore_index, label_smoothing, z_loss,
                 softcap, logits)

    ce_fwd = define("ce_fwd", fwd_impl)
    ce_bwd = define("ce_bwd", bwd_out_of_place)
    ce_bwd_inplace = define("ce_bwd_inplace", bwd_inplace, mutates_args=("logits",))
    ce_fwd.register_fake(ce_fwd_fake)
    ce_bwd.register_fake(ce_bwd_fake)
    ce_bwd_inplace.register_fake(ce_bwd_inplace_fake)
    return CrossEntropyOps(ce_fwd, ce_bwd, ce_bwd_inplace)


def register_cross_entropy_fakes(tier: str) -> CrossEntropyOps:
    """For ops defined in C++: attach the fakes and return the op handles."""
    ops = torch.ops.fusedops
    torch.library.register_fake(op_name("ce_fwd", tier))(ce_fwd_fake)
    torch.library.register_fake(op_name("ce_bwd", tier))(ce_bwd_fake)
    torch.library.register_fake(op_name("ce_bwd_inplace", tier))(ce_bwd_inplace_fake)
    return CrossEntropyOps(getattr(ops, f"ce_fwd_{tier}").default,
                           getattr(ops, f"ce_bwd_{tier}").default,
                           getattr(ops, f"ce_bwd_inplace_{tier}").default)


def tier_functions(ops: CrossEntropyOps):
    """A tier's ``ce_fwd`` and ``ce_bwd`` (with ``inplace``) over its custom ops."""

    def ce_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap):
        return ops.fwd(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap)

    def ce_bwd(logits, target, weight, lse, grad_loss, ignore_index, label_smoothing, z_loss,
               softcap, inplace):
        return run_ce_bwd(ops, logits, target, weight, lse, grad_loss, ignore_index,
                          label_smoothing, z_loss, softcap, inplace)

    return ce_fwd, ce_bwd


def run_ce_bwd(ops: CrossEntropyOps, logits, target, weight, lse, grad_loss, ignore_index,
               label_smoothing, z_loss, softcap, inplace):
    """The tier-level ``ce_bwd``: picks the in-place or out-of-place custom op."""
    if inplace:
        ops.bwd_inplace(logits, target, weight, lse, grad_loss, ignore_index, label_smoothing,
                        z_loss, softcap)
        return logits
    return ops.bwd(logits, target, weight, lse, grad_loss, ignore_index, label_smoothing,
                   z_loss, softcap)
