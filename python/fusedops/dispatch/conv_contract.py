"""The kernel-level contract of the fused convolution: ``act(conv2d(x, W) + b + r)``.

Every tier implements these two functions with this meaning (a CUDA tier through C++ ops
under the same schemas), registered as ``fusedops::conv2d_fwd_<tier>`` and
``fusedops::conv2d_bwd_<tier>`` custom ops with the fakes below.

``conv2d_fwd(input, weight, bias, residual, stride_h, stride_w, pad_h, pad_w, dilation_h,
dilation_w, out_h, out_w, groups, activation, out_channels_last, allow_tf32)
-> (out, saved)``

* ``input`` ``(N, C, H, W)`` and ``weight`` ``(K, C / groups, R, S)``, one dtype (float16,
  bfloat16, float32; the torch tier also float64), any strides (a tier converts to the
  layout its kernels read: the Triton tier reads NHWC, so an NCHW input costs it one copy);
  ``bias`` ``(K,)`` or None; ``residual`` ``(N, K, out_h, out_w)`` in any strides, or None.
* Output pixel ``(oh, ow)`` reads input rows ``oh * stride_h - pad_h + r * dilation_h`` for
  ``r < R`` (likewise columns); rows and columns outside the input read as zero. ``pad_h``
  and ``pad_w`` are the top and left padding; ``out_h`` and ``out_w`` (>= 1) fix the rest,
  so torch's uneven "same" padding (the extra row at the bottom) needs nothing more.
* ``groups``: 1, or ``C`` (depthwise: output channel ``k`` reads input channel
  ``k // (K // C)``); the kernels cover these two, other counts are the torch tier's.
* ``out`` ``(N, K, out_h, out_w)`` in the input's dtype, channels_last when
  ``out_channels_last`` else contiguous; ``z = conv + bias + residual`` accumulated in
  float32, ``out = act(z)``.
* ``saved`` as in linear_contract.SAVES: an empty ``(0,)`` tensor for "none" and "relu"
  (the caller keeps ``out`` for relu), the pre-activation ``z`` laid out like ``out`` for
  "gelu", "gelu_tanh" and "silu".
* ``allow_tf32``: float32 products may use tf32 tensor cores (the caller decides it as torch
  decides for cuDNN convolutions, ``torch.backends.cudnn.allow_tf32``). A tier whose float32
  kernels multiply only in tf32 (the CUDA tier's implicit GEMM) declines float32 without it:
  its ``conv2d_unsupported`` says so, and its ops raise NotImplementedError if called anyway.

``conv2d_bwd(grad_out, input, weight, saved, <the geometry above>, groups, activation,
allow_tf32, needs_input_grad, needs_weight_grad, needs_bias_grad, needs_preact_grad)
-> (grad_input, grad_weight, grad_bias, grad_preact)``

* With ``dz = grad_out * act'(z)`` (formed inside the kernels as tiles are loaded):
  ``grad_input`` like ``input`` (``torch.empty_like``), ``grad_weight`` like ``weight``,
  ``grad_bias = dz`` summed over N, out_h, out_w ``(K,)`` in the weight's dtype, and
  ``grad_preact = dz`` like ``grad_out`` (the residual's gradient), each accumulated in
  float32. A gradient not asked for comes back as an empty ``(0,)`` tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from fusedops.dispatch.contract import op_name
from fusedops.dispatch.linear_contract import ACTIVATIONS, SAVES, saves_preactivation

GEOMETRY = ("int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, "
            "SymInt out_h, SymInt out_w, int groups")
SCHEMAS = {
    "conv2d_fwd": f"(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, {GEOMETRY}, "
                  "str activation, bool out_channels_last, bool allow_tf32) -> (Tensor, Tensor)",
    "conv2d_bwd": f"(Tensor grad_out, Tensor input, Tensor weight, Tensor saved, {GEOMETRY}, "
                  "str activation, bool allow_tf32, bool needs_input_grad, "
                  "bool needs_weight_grad, bool needs_bias_grad, bool needs_preact_grad) "
                  "-> (Tensor, Tensor, Tensor, Tensor)",
}


def output_like(input: torch.Tensor, channels: int, out_h, out_w, channels_last: bool,
                empty=torch.empty) -> torch.Tensor:
    """An ``(N, channels, out_h, out_w)`` tensor in the input's dtype and the asked layout."""
    shape = (input.shape[0], channels, out_h, out_w)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return empty(shape, dtype=input.dtype, device=input.device, memory_format=memory_format)


def conv2d_fwd_fake(input, weight, bias, residual, stride_h, stride_w, pad_h, pad_w,
                    dilation_h, dilation_w, out_h, out_w, groups, activation, out_channels_last,
                    allow_tf32):
    out = output_like(input, weight.shape[0], out_h, out_w, out_channels_last)
    if saves_preactivation(activation):
        return out, torch.empty_like(out)
    return out, input.new_empty((0,))


def conv2d_bwd_fake(grad_out, input, weight, saved, stride_h, stride_w, pad_h, pad_w,
                    dilation_h, dilation_w, out_h, out_w, groups, activation, allow_tf32,
                    needs_input_grad, needs_weight_grad, needs_bias_grad, needs_preact_grad):
    def maybe(needed, make):
        return make() if needed else input.new_empty((0,))

    return (maybe(needs_input_grad, lambda: torch.empty_like(input)),
            maybe(needs_weight_grad, lambda: torch.empty_like(weight)),
            maybe(needs_bias_grad, lambda: weight.new_empty((weight.shape[0],))),
            maybe(needs_preact_grad, lambda: torch.empty_like(grad_out)))


class ConvOps(NamedTuple):
    fwd: Callable
    bwd: Callable


def register_conv_ops(tier: str, fwd_impl: Callable, bwd_impl: Callable,
                      device_types: str | tuple[str, ...] | None = None) -> ConvOps:
    """Wrap a tier's implementations (with the contract's signatures) as custom ops."""
    ops = []
    for op, impl, fake in (("conv2d_fwd", fwd_impl, conv2d_fwd_fake),
                           ("conv2d_bwd", bwd_impl, conv2d_bwd_fake)):
        custom = torch.library.custom_op(op_name(op, tier), impl, mutates_args=(),
                                         device_types=device_types, schema=SCHEMAS[op])
        custom.register_fake(fake)
        ops.append(custom)
    return ConvOps(*ops)


def register_conv_fakes(tier: str) -> ConvOps:
    """For ops defined in C++ (the CUDA tier): attach the fakes and return the op handles."""
    torch.library.register_fake(op_name("conv2d_fwd", tier))(conv2d_fwd_fake)
    torch.library.register_fake(op_name("conv2d_bwd", tier))(conv2d_bwd_fake)
    ops = torch.ops.fusedops
    return ConvOps(getattr(ops, f"conv2d_fwd_{tier}").default,
                   getattr(ops, f"conv2d_bwd_{tier}").default)


__all__ = ["ACTIVATIONS", "SAVES", "SCHEMAS", "ConvOps", "conv2d_bwd_fake", "conv2d_fwd_fake",
           "output_like", "register_conv_fakes", "register_conv_ops"]
