"""The kernel-level contract of the fused linear: ``act(x @ W^T + b + r)``, forward and backward.

Every tier implements these two functions with this meaning (a future CUDA tier through C++
ops under the same schemas), registered as ``fusedops::linear_fwd_<tier>`` and
``fusedops::linear_bwd_<tier>`` custom ops with the fakes below.

``linear_fwd(input, weight, bias, residual, activation, allow_tf32) -> (out, saved)``

* ``input`` ``(M, K)``, ``weight`` ``(N, K)``, both of one dtype (float16, bfloat16, float32;
  the torch tier also float64), any strides; ``bias`` ``(N,)`` or None; ``residual``
  ``(M, N)`` or None, in the input's dtype. ``activation`` is one of ``ACTIVATIONS``.
* ``allow_tf32``: float32 products may use tf32 tensor cores (the caller decides it the way
  torch does, from ``torch.backends.cuda.matmul.allow_tf32``).
* ``out`` ``(M, N)`` contiguous, the input's dtype: ``act(z)`` with
  ``z = input @ weight.T + bias + residual``, accumulated in float32.
* ``saved``: what backward needs to form act'(z), chosen per activation (``SAVES``).
  ``"none"`` needs nothing and ``"relu"`` needs only ``out`` (relu'(z) = [out > 0]): ``saved``
  is an empty ``(0,)`` tensor (a custom op may not return an alias of another output), and
  the caller keeps ``out`` instead — no extra memory. ``"gelu"``, ``"gelu_tanh"`` and
  ``"silu"`` return the pre-activation ``z`` ``(M, N)`` in the input's dtype: one more
  output-sized tensor kept for backward, the price of not recomputing the forward GEMM.

``linear_bwd(grad_out, input, weight, saved, activation, allow_tf32, needs_input_grad,
needs_weight_grad, needs_bias_grad, needs_preact_grad)
-> (grad_input, grad_weight, grad_bias, grad_preact)``

* ``grad_out`` ``(M, N)``; ``saved`` is ``linear_fwd``'s, except ``out`` for relu (and
  anything, e.g. an empty tensor, for "none").
* With ``dz = grad_out * act'(z)``: ``grad_input = dz @ weight`` ``(M, K)``,
  ``grad_weight = dz.T @ input`` ``(N, K)``, ``grad_bias = dz.sum(0)`` ``(N,)`` (each in its
  input's dtype, accumulated in float32) and ``grad_preact = dz`` ``(M, N)`` (the residual's
  gradient). A gradient not asked for comes back as an empty ``(0,)`` tensor.

``linear_weight_grad_accumulate(grad_out, input, grad_weight, grad_bias, allow_tf32) -> ()``

* Adds ``grad_out.T @ input`` into the float32 ``grad_weight`` ``(N, K)`` and
  ``grad_out.sum(0)`` into the float32 ``grad_bias`` ``(N,)`` (or None), in place, with no
  activation: for a caller that sums weight gradients over several calls (the token chunks
  of linear_cross_entropy) without a temporary of the weight's size per call.
* The Triton kernels form ``dz`` inside the backward GEMMs (act' applied to the tiles as they
  are loaded). The CUDA tier's GEMMs take their operands straight from TMA into shared
  memory, so it forms ``dz`` in one pass before them (csrc/matmul/linear_bwd_prologue.cu),
  the same pass that reduces the bias gradient; with activation "none" that pass only sums.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from fusedops.dispatch.contract import NAMESPACE, op_name

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")
# What linear_fwd keeps for backward, per activation.
SAVES = {"none": "nothing", "relu": "out", "gelu": "preact", "gelu_tanh": "preact",
         "silu": "preact"}

SCHEMAS = {
    "linear_fwd": "(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, "
                  "str activation, bool allow_tf32) -> (Tensor, Tensor)",
    "linear_bwd": "(Tensor grad_out, Tensor input, Tensor weight, Tensor saved, "
                  "str activation, bool allow_tf32, bool needs_input_grad, "
                  "bool needs_weight_grad, bool needs_bias_grad, bool needs_preact_grad) "
                  "-> (Tensor, Tensor, Tensor, Tensor)",
    "linear_weight_grad_accumulate": "(Tensor grad_out, Tensor input, Tensor(a!) grad_weight, "
                                     "Tensor(b!)? grad_bias, bool allow_tf32) -> ()",
}


def call_unsupported(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     residual: torch.Tensor | None, activation: str,
                     dtypes: tuple[torch.dtype, ...], kernels: str) -> str | None:
    """What every kernel tier checks first: the activation, the dtypes (``dtypes`` covered by
    ``kernels``, e.g. "the Triton kernels"), 2-D operands, one device. None when they pass."""
    if activation not in ACTIVATIONS:
        return f"activation {activation!r} (the kernels take {ACTIVATIONS})"
    if input.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        return f"{input.dtype} input ({kernels} take {names})"
    if weight.dtype != input.dtype:
        return f"weight dtype {weight.dtype} differs from the input's {input.dtype}"
    if input.dim() != 2 or weight.dim() != 2:
        return "input and weight must be 2-D here (the functional layer flattens the batch)"
    devices = {t.device for t in (input, weight, bias, residual) if t is not None}
    if len(devices) != 1:
        return f"tensors on several devices ({sorted(map(str, devices))})"
    return None


def saves_preactivation(activation: str) -> bool:
    return SAVES[activation] == "preact"


def linear_fwd_fake(input, weight, bias, residual, activation, allow_tf32):
    rows, cols = input.shape[0], weight.shape[0]
    out = input.new_empty((rows, cols))
    saved = input.new_empty((rows, cols) if saves_preactivation(activation) else (0,))
    return out, saved


def linear_bwd_fake(grad_out, input, weight, saved, activation, allow_tf32, needs_input_grad,
                    needs_weight_grad, needs_bias_grad, needs_preact_grad):
    def maybe(needed, like, shape):
        return like.new_empty(shape if needed else (0,))

    return (maybe(needs_input_grad, input, input.shape),
            maybe(needs_weight_grad, weight, weight.shape),
            maybe(needs_bias_grad, weight, (weight.shape[0],)),
            maybe(needs_preact_grad, grad_out, grad_out.shape))


def linear_weight_grad_accumulate_fake(grad_out, input, grad_weight, grad_bias, allow_tf32):
    return None


class LinearOps(NamedTuple):
    fwd: Callable
    bwd: Callable
    weight_grad_accumulate: Callable


def register_linear_ops(tier: str, fwd_impl: Callable, bwd_impl: Callable,
                        accumulate_impl: Callable,
                        device_types: str | tuple[str, ...] | None = None) -> LinearOps:
    """Wrap a tier's implementations (with the contract's signatures) as custom ops."""
    ops = []
    for op, impl, fake, mutates in (
            ("linear_fwd", fwd_impl, linear_fwd_fake, ()),
            ("linear_bwd", bwd_impl, linear_bwd_fake, ()),
            ("linear_weight_grad_accumulate", accumulate_impl,
             linear_weight_grad_accumulate_fake, ("grad_weight", "grad_bias"))):
        custom = torch.library.custom_op(op_name(op, tier), impl, mutates_args=mutates,
                                         device_types=device_types, schema=SCHEMAS[op])
        custom.register_fake(fake)
        ops.append(custom)
    return LinearOps(*ops)


def register_linear_fakes(tier: str) -> LinearOps:
    """For ops defined in C++ (the CUDA tier): attach the fakes and return the op handles."""
    for op, fake in (("linear_fwd", linear_fwd_fake), ("linear_bwd", linear_bwd_fake),
                     ("linear_weight_grad_accumulate", linear_weight_grad_accumulate_fake)):
        torch.library.register_fake(op_name(op, tier))(fake)
    ops = torch.ops.fusedops
    return LinearOps(getattr(ops, f"linear_fwd_{tier}").default,
                     getattr(ops, f"linear_bwd_{tier}").default,
                     getattr(ops, f"linear_weight_grad_accumulate_{tier}").default)


__all__ = ["ACTIVATIONS", "NAMESPACE", "SAVES", "SCHEMAS", "LinearOps", "call_unsupported",
           "register_linear_fakes",
           "register_linear_ops", "saves_preactivation"]
