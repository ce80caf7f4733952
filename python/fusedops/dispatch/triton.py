"""The Triton tier: the kernel-level contract on ``fusedops.triton_kernels``.

It runs on CUDA (and ROCm) devices, and on CPU tensors in Triton's interpreter when
``TRITON_INTERPRET=1`` was set before triton was first imported (the test suite's CPU tier).
This module never imports triton itself at import time: the kernels are imported on first
use, after the caller (the benchmark CLI, the tests) has decided ``TRITON_INTERPRET``.

Class-index targets only; probability targets and float64 stay on the torch tier.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

from fusedops._compile import assume_constant_result
from fusedops.dispatch import attention_contract, contract, conv_contract, linear_contract

NAME = "triton"

_LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TARGET_DTYPES = (torch.int32, torch.int64)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _imported_without_interpreter() -> bool:
    """True when TRITON_INTERPRET=1 came only after triton was imported (too late for it).

    Triton decides at import time whether its own @jit library functions are interpreted; a
    kernel run in the interpreter then fails on the first of them with an obscure error.
    """
    standard = sys.modules.get("triton.language.standard")
    if standard is None:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction

        return not isinstance(standard.sigmoid, InterpretedFunction)
    except (ImportError, AttributeError):  # a Triton whose internals moved: assume all is well
        return False


# torch.compile evaluates it once at trace time (older Dynamo cannot trace find_spec).
@assume_constant_result
def availability() -> str | None:
    """None when this tier can run here, else why not (cheap: imports nothing)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'fusedops[triton]')"
    if _interpreting():
        if _imported_without_interpreter():
            return ("TRITON_INTERPRET=1 was set after triton was imported; Triton's interpreter "
                    "needs it set before the first import of triton")
        return None
    if not torch.cuda.is_available():
        return "no CUDA device, and TRITON_INTERPRET=1 (Triton's CPU interpreter) is not set"
    return None


def _device_unsupported(tensor: torch.Tensor) -> str | None:
    """None when this tier can run on ``tensor``'s device, else why not."""
    if tensor.device.type == "cpu":
        if not _interpreting():
            return "CPU tensors run only in Triton's interpreter (set TRITON_INTERPRET=1)"
    elif tensor.device.type != "cuda":
        return f"tensors on {tensor.device.type} (the Triton tier runs on CUDA devices)"
    return None


def ce_unsupported(logits: torch.Tensor, target: torch.Tensor, *, probability_target: bool
                   ) -> str | None:
    """None when the kernels cover this call, else the reason (no host sync)."""
    if probability_target:
        return "class-probability targets run on the torch tier only"
    if logits.dtype not in _LOGIT_DTYPES:
        return f"{logits.dtype} logits (the Triton kernels take float16, bfloat16 and float32)"
    if target.dtype not in _TARGET_DTYPES:
        return f"{target.dtype} targets (the Triton kernels take int32 and int64)"
    if logits.dim() != 2 or logits.shape[1] == 0:
        return f"logits of shape {tuple(logits.shape)} (the kernels take (N, C) with C >= 1)"
    if logits.stride(1) != 1:
        return "the class dimension of the logits is not contiguous (stride(1) != 1)"
    return _device_unsupported(logits)


def _kernels():
    # Imported here, not at the top: TRITON_INTERPRET must be decided before triton loads.
    from fusedops.triton_kernels import cross_entropy

    return cross_entropy


def _ce_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap):
    rows = logits.shape[0]
    loss = contract.new_output((rows,), dtype=torch.float32, device=logits.device)
    lse = contract.new_output((rows,), dtype=torch.float32, device=logits.device)
    weight = weight.contiguous() if weight is not None else None
    _kernels().ce_fwd_launch(logits, target.contiguous(), weight, ignore_index,
                             label_smoothing, z_loss, softcap, loss, lse)
    return loss, lse


def _ce_bwd(logits, target, weight, lse, grad_loss, ignore_index, label_smoothing, z_loss,
            softcap, out):
    weight = weight.contiguous() if weight is not None else None
    _kernels().ce_bwd_launch(logits, target.contiguous(), weight, lse.contiguous(),
                             grad_loss.contiguous(), ignore_index, label_smoothing, z_loss,
                             softcap, out)


ce_fwd, ce_bwd = contract.tier_functions(
    contract.register_cross_entropy_ops(NAME, _ce_fwd, _ce_bwd))


# --- the fused linear: act(x @ W^T + b + r) ---------------------------------------------

_LINEAR_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def linear_unsupported(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       residual: torch.Tensor | None, activation: str) -> str | None:
    """None when the kernels cover this call (input (M, K), weight (N, K)), else the reason."""
    reason = linear_contract.call_unsupported(input, weight, bias, residual, activation,
                                              _LINEAR_DTYPES, "the Triton kernels")
    if reason is not None:
        return reason
    for name, tensor in (("bias", bias), ("residual", residual)):
        if tensor is not None and tensor.dtype not in _LINEAR_DTYPES:
            return f"{tensor.dtype} {name} (the Triton kernels take float16, bfloat16, float32)"
    return _device_unsupported(input)


def _matmul_kernels():
    # Imported here, not at the top: TRITON_INTERPRET must be decided before triton loads.
    from fusedops.triton_kernels import matmul

    return matmul


def _linear_fwd(input, weight, bias, residual, activation, allow_tf32):
    rows, cols = input.shape[0], weight.shape[0]
    out = contract.new_output((rows, cols), dtype=input.dtype, device=input.device)
    if linear_contract.saves_preactivation(activation):
        z = contract.new_output((rows, cols), dtype=input.dtype, device=input.device)
    else:
        z = None
    _matmul_kernels().linear_fwd_launch(input, weight, bias, residual, activation,
                                        allow_tf32, out, z)
    return out, z if z is not None else input.new_empty((0,))


def _linear_bwd(grad_out, input, weight, saved, activation, allow_tf32, needs_input_grad,
                needs_weight_grad, needs_bias_grad, needs_preact_grad):
    device = input.device

    def maybe(needed, shape, dtype):
        return contract.new_output(shape, dtype=dtype, device=device) if needed else None

    grad_input = maybe(needs_input_grad, input.shape, input.dtype)
    grad_weight = maybe(needs_weight_grad, weight.shape, weight.dtype)
    grad_bias = maybe(needs_bias_grad, (weight.shape[0],), weight.dtype)
    grad_preact = maybe(needs_preact_grad, grad_out.shape, grad_out.dtype)
    _matmul_kernels().linear_bwd_launch(grad_out, input, weight, saved, activation, allow_tf32,
                                        grad_input, grad_weight, grad_bias, grad_preact)

    def or_empty(t):  # a fresh one each time: custom-op outputs may not alias each other
        return t if t is not None else input.new_empty((0,))

    return or_empty(grad_input), or_empty(grad_weight), or_empty(grad_bias), or_empty(grad_preact)


def _linear_weight_grad_accumulate(grad_out, input, grad_weight, grad_bias, allow_tf32):
    _matmul_kernels().weight_grad_accumulate_launch(grad_out, input, grad_weight, grad_bias,
                                                    allow_tf32)


linear_ops = linear_contract.register_linear_ops(NAME, _linear_fwd, _linear_bwd,
                                                 _linear_weight_grad_accumulate)
linear_fwd, linear_bwd = linear_ops.fwd, linear_ops.bwd
linear_weight_grad_accumulate = linear_ops.weight_grad_accumulate


# --- attention (see attention_contract.py) ----------------------------------------------

_ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_GRID_LIMIT = 65535  # CUDA's limit on the grid's y and z dimensions (heads and batch)


def attention_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: bool
                          ) -> str | None:
    """None when the kernels cover this call (arguments already checked), else the reason."""
    if q.dtype not in _ATTENTION_DTYPES:
        return f"{q.dtype} inputs (the Triton kernels take float16, bfloat16 and float32)"
    head_dim = q.shape[-1]
    if head_dim not in attention_contract.HEAD_DIMS:
        return f"head dim {head_dim} (the kernels take {attention_contract.HEAD_DIMS})"
    heads = q.shape[-2] if packed else q.shape[1]
    batch = None if packed else q.shape[0]
    if heads > _GRID_LIMIT or (batch is not None and batch > _GRID_LIMIT):
        return f"more than {_GRID_LIMIT} heads or sequences in one call"
    return _device_unsupported(q)


def _attention_kernels():
    # Imported here, not at the top: TRITON_INTERPRET must be decided before triton loads.
    from fusedops.triton_kernels import attention

    return attention


def _attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                   window_left, window_right, allow_tf32):
    out = contract.new_output_like(q)
    lse = contract.new_output(attention_contract.lse_shape(
        q, attention_contract.is_packed(cu_seqlens_q)), dtype=torch.float32, device=q.device)
    _attention_kernels().attention_fwd_launch(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                              max_seqlen_q, max_seqlen_k, scale, window_left,
                                              window_right, allow_tf32, out, lse)
    return out, lse


def _attention_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                   max_seqlen_k, scale, window_left, window_right, allow_tf32, deterministic):
    grad_q, grad_k, grad_v = (contract.new_output_like(t) for t in (q, k, v))
    _attention_kernels().attention_bwd_launch(grad_out, q, k, v, out, lse, cu_seqlens_q,
                                              cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                              window_left, window_right, allow_tf32,
                                              deterministic, grad_q, grad_k, grad_v)
    return grad_q, grad_k, grad_v


attention_ops = attention_contract.register_attention_ops(NAME, _attention_fwd, _attention_bwd)
attention_fwd, attention_bwd = attention_ops.fwd, attention_ops.bwd


# --- fused convolution (see conv_contract.py) ---------------------------------------------

_CONV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def conv2d_unsupported(input, weight, bias, residual, groups, activation) -> str | None:
    """None when the kernels cover this call (arguments already checked), else the reason."""
    if activation not in linear_contract.ACTIVATIONS:
        return f"activation {activation!r} (the kernels take {linear_contract.ACTIVATIONS})"
    if input.dtype not in _CONV_DTYPES:
        return f"{input.dtype} input (the Triton kernels take float16, bfloat16 and float32)"
    channels = input.shape[1]
    pixels = input.shape[0] * input.shape[2] * input.shape[3]
    if pixels >= 2 ** 31:  # the kernels index pixels in 32 bits (their offsets are 64-bit)
        return f"{pixels} input pixels (the kernels take fewer than 2**31)"
    if groups != 1 and not (groups == channels and weight.shape[1] == 1):
        return (f"groups={groups} (the kernels take groups=1 and depthwise, groups == "
                f"in_channels = {channels})")
    return _device_unsupported(input)


def _conv_kernels(groups: int):
    # Imported here, not at the top: TRITON_INTERPRET must be decided before triton loads.
    if groups == 1:
        from fusedops.triton_kernels import conv

        return conv.conv2d_fwd_launch, conv.conv2d_bwd_launch
    from fusedops.triton_kernels import conv_depthwise

    return conv_depthwise.depthwise_fwd_launch, conv_depthwise.depthwise_bwd_launch


def _new_like(template: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(template)
    if contract.poisoning():
        out.fill_(float("nan"))
    return out


def _conv2d_fwd(input, weight, bias, residual, stride_h, stride_w, pad_h, pad_w, dilation_h,
                dilation_w, out_h, out_w, groups, activation, out_channels_last, allow_tf32):
    out = conv_contract.output_like(input, weight.shape[0], out_h, out_w, out_channels_last)
    if contract.poisoning():
        out.fill_(float("nan"))
    z = _new_like(out) if linear_contract.saves_preactivation(activation) else None
    geometry = ((stride_h, stride_w), (pad_h, pad_w), (dilation_h, dilation_w))
    fwd, _ = _conv_kernels(groups)
    if groups == 1:
        fwd(input, weight, bias, residual, *geometry, activation, allow_tf32, out, z)
    else:
        fwd(input, weight, bias, residual, *geometry, activation, out, z)
    return out, z if z is not None else input.new_empty((0,))


def _conv2d_bwd(grad_out, input, weight, saved, stride_h, stride_w, pad_h, pad_w, dilation_h,
                dilation_w, out_h, out_w, groups, activation, allow_tf32, needs_input_grad,
                needs_weight_grad, needs_bias_grad, needs_preact_grad):
    grad_input = _new_like(input) if needs_input_grad else None
    grad_weight = _new_like(weight) if needs_weight_grad else None
    grad_bias = (contract.new_output((weight.shape[0],), dtype=weight.dtype,
                                     device=weight.device) if needs_bias_grad else None)
    grad_preact = _new_like(grad_out) if needs_preact_grad else None
    geometry = ((stride_h, stride_w), (pad_h, pad_w), (dilation_h, dilation_w))
    _, bwd = _conv_kernels(groups)
    if groups == 1:
        bwd(grad_out, input, weight, saved, *geometry, activation, allow_tf32, grad_input,
            grad_weight, grad_bias, grad_preact)
    else:
        bwd(grad_out, input, weight, saved, *geometry, activation, grad_input, grad_weight,
            grad_bias, grad_preact)

    def or_empty(t):  # a fresh one each time: custom-op outputs may not alias each other
        return t if t is not None else input.new_empty((0,))

    return or_empty(grad_input), or_empty(grad_weight), or_empty(grad_bias), or_empty(grad_preact)


conv_ops = conv_contract.register_conv_ops(NAME, _conv2d_fwd, _conv2d_bwd)
conv2d_fwd, conv2d_bwd = conv_ops.fwd, conv_ops.bwd
