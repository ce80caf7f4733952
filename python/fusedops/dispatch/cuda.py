"""The CUDA tier: the kernel-level contract on the CUDA C++ kernels of csrc/.

The ops themselves (``torch.ops.fusedops.ce_fwd_cuda`` etc.) are defined and implemented in
C++ (csrc/bindings.cpp). Nothing is loaded when this module is imported: the first call of
``load()`` (or of a kernel-level function) loads ``fusedops._C`` through
``fusedops._extension`` — the installed build, or a JIT build on first use — and attaches
the contract's fake implementations so that ``torch.compile`` can trace the ops.
"""

from __future__ import annotations

import threading
from types import ModuleType

import torch

from fusedops import _extension
from fusedops._compile import assume_constant_result
from fusedops.dispatch import attention_contract, contract, conv_contract, linear_contract

NAME = "cuda"

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int64, torch.int32)
_MAX_EXTENT = 2**31 - 1  # one thread block per row, int column indices
_lock = threading.Lock()
_ops: contract.CrossEntropyOps | None = None
_linear_ops: linear_contract.LinearOps | None = None


# Under torch.compile, dynamo runs the two functions marked assume_constant_result for real
# at trace time and bakes in their result, instead of tracing through file-system lookups,
# a lock and a possible JIT build; the ops they make available are then traced as usual.


@assume_constant_result
def availability() -> str | None:
    """None when the CUDA kernels can run here, else why not (cheap: never builds)."""
    return _extension.availability()


def load() -> ModuleType:
    """Load ``fusedops._C`` and register the fakes of its ops (once). Needs no GPU."""
    global _ops, _linear_ops
    module = _extension.load()
    if _ops is None:
        with _lock:
            if _ops is None:
                _linear_ops = linear_contract.register_linear_fakes(NAME)
                attention_contract.register_attention_fakes(NAME)
                conv_contract.register_conv_fakes(NAME)
                _ops = contract.register_cross_entropy_fakes(NAME)
    return module


@assume_constant_result
def _ensure_loaded() -> bool:
    if _ops is None:
        load()
    return True


def _cross_entropy_ops() -> contract.CrossEntropyOps:
    _ensure_loaded()
    return contract.CrossEntropyOps(torch.ops.fusedops.ce_fwd_cuda.default,
                                    torch.ops.fusedops.ce_bwd_cuda.default,
                                    torch.ops.fusedops.ce_bwd_inplace_cuda.default)


def ce_unsupported(logits: torch.Tensor, target: torch.Tensor, *, probability_target: bool
                   ) -> str | None:
    """None when the CUDA kernels cover this call, else the reason."""
    if probability_target:
        return "class-probability targets are not implemented in the CUDA kernels"
    if logits.device.type != "cuda" or target.device.type != "cuda":
        return f"the tensors are on {logits.device}, not on a CUDA device"
    if logits.dtype not in _LOGIT_DTYPES:
        return f"{logits.dtype} logits are not supported (float32, float16, bfloat16 are)"
    if target.dtype not in _INDEX_DTYPES:
        return f"{target.dtype} targets are not supported (int64, int32 are)"
    if logits.dim() != 2:
        return f"logits must be 2-D (rows, classes), got shape {tuple(logits.shape)}"
    rows, classes = logits.shape
    if logits.stride(1) != 1 and classes > 1:
        return f"the class dimension is not contiguous (strides {logits.stride()})"
    if rows > _MAX_EXTENT or classes > _MAX_EXTENT:
        return f"shape {tuple(logits.shape)}: rows and classes must each be below 2**31"
    return None


def ce_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap):
    return _cross_entropy_ops().fwd(logits, target, weight, ignore_index, label_smoothing,
                                    z_loss, softcap)


def ce_bwd(logits, target, weight, lse, grad_loss, ignore_index, label_smoothing, z_loss, softcap,
           inplace):
    return contract.run_ce_bwd(_cross_entropy_ops(), logits, target, weight, lse, grad_loss,
                               ignore_index, label_smoothing, z_loss, softcap, inplace)


# --- the fused linear: act(x @ W^T + b + r) (linear_contract.py; csrc/matmul/) -----------

_GEMM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def linear_unsupported(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       residual: torch.Tensor | None, activation: str) -> str | None:
    """None when the CUDA GEMM covers this call (input (M, K), weight (N, K)), else why not."""
    reason = linear_contract.call_unsupported(input, weight, bias, residual, activation,
                                              _GEMM_DTYPES, "the CUDA GEMM's kernels (tf32)")
    if reason is not None:
        return reason
    if input.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return ("float32 at full precision: the CUDA GEMM multiplies float32 only in tf32 "
                "(torch.set_float32_matmul_precision('high') allows that)")
    if input.device.type != "cuda":
        return f"the tensors are on {input.device}, not on a CUDA device"
    if input.shape[0] > _MAX_EXTENT or weight.shape[0] > _MAX_EXTENT:
        return f"M = {input.shape[0]} or N = {weight.shape[0]} is 2**31 or more"
    return None


def _linear_ops_loaded() -> linear_contract.LinearOps:
    _ensure_loaded()
    return linear_contract.LinearOps(torch.ops.fusedops.linear_fwd_cuda.default,
                                     torch.ops.fusedops.linear_bwd_cuda.default,
                                     torch.ops.fusedops.linear_weight_grad_accumulate_cuda.default)


def linear_fwd(input, weight, bias, residual, activation, allow_tf32):
    return _linear_ops_loaded().fwd(input, weight, bias, residual, activation, allow_tf32)


def linear_bwd(grad_out, input, weight, saved, activation, allow_tf32, needs_input_grad,
               needs_weight_grad, needs_bias_grad, needs_preact_grad):
    return _linear_ops_loaded().bwd(grad_out, input, weight, saved, activation, allow_tf32,
                                    needs_input_grad, needs_weight_grad, needs_bias_grad,
                                    needs_preact_grad)


def linear_weight_grad_accumulate(grad_out, input, grad_weight, grad_bias, allow_tf32):
    _linear_ops_loaded().weight_grad_accumulate(grad_out, input, grad_weight, grad_bias,
                                                allow_tf32)


# --- attention (attention_contract.py; csrc/attention/) ----------------------------------

_ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
_GRID_LIMIT = 65535  # sequences and heads per call


def attention_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: bool
                          ) -> str | None:
    """None when the CUDA kernels cover this call (arguments already checked), else why not."""
    if q.dtype not in _ATTENTION_DTYPES:
        return (f"{q.dtype} inputs: the CUDA attention kernels take float16 and bfloat16 "
                "(float32 runs on the Triton or torch tier)")
    head_dim = q.shape[-1]
    if head_dim not in attention_contract.HEAD_DIMS:
        return f"head dim {head_dim} (the kernels take {attention_contract.HEAD_DIMS})"
    heads = q.shape[-2] if packed else q.shape[1]
    if heads > _GRID_LIMIT or (not packed and q.shape[0] > _GRID_LIMIT):
        return f"more than {_GRID_LIMIT} heads or sequences in one call"
    if q.device.type != "cuda":
        return f"the tensors are on {q.device}, not on a CUDA device"
    return None


def attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                  window_left, window_right, allow_tf32):
    _ensure_loaded()
    return torch.ops.fusedops.attention_fwd_cuda.default(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
        window_right, allow_tf32)


def attention_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                  max_seqlen_k, scale, window_left, window_right, allow_tf32, deterministic):
    _ensure_loaded()
    return torch.ops.fusedops.attention_bwd_cuda.default(
        grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        scale, window_left, window_right, allow_tf32, deterministic)


# --- fused convolution (conv_contract.py; csrc/conv/) ------------------------------------

_CONV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@assume_constant_result
def _conv_allow_tf32() -> bool:
    """torch.backends.cudnn.allow_tf32 as fusedops.conv2d reads it (and, like it, baked in at
    trace time under torch.compile)."""
    from fusedops.ops.conv import allow_tf32  # at call time: fusedops.ops imports dispatch
    return allow_tf32()


def conv2d_unsupported(input, weight, bias, residual, groups, activation) -> str | None:
    """None when the CUDA kernels cover this call (arguments already checked), else why not."""
    if activation not in linear_contract.ACTIVATIONS:
        return f"activation {activation!r} (the kernels take {linear_contract.ACTIVATIONS})"
    channels = input.shape[1]
    depthwise = groups != 1
    if depthwise and not (groups == channels and weight.shape[1] == 1):
        return (f"groups={groups} (the kernels take groups=1 and depthwise, groups == "
                f"in_channels = {channels})")
    pixels = input.shape[0] * input.shape[2] * input.shape[3]
    if pixels >= 2 ** 31:  # pixel indices are 32-bit in the kernels (offsets are 64-bit)
        return f"{pixels} input pixels (the kernels take fewer than 2**31)"
    if input.dtype not in _CONV_DTYPES:
        return (f"{input.dtype} input: the CUDA convolution takes float16, bfloat16 and "
                "float32")
    if input.dtype == torch.float32 and not depthwise and not _conv_allow_tf32():
        return ("float32 at full precision: the CUDA implicit-GEMM convolution multiplies "
                "float32 only in tf32 (torch.backends.cudnn.allow_tf32 = True allows that; "
                "the depthwise kernel is exact)")
    if input.device.type != "cuda":
        return f"the tensors are on {input.device}, not on a CUDA device"
    return None


def conv2d_fwd(input, weight, bias, residual, stride_h, stride_w, pad_h, pad_w, dilation_h,
               dilation_w, out_h, out_w, groups, activation, out_channels_last, allow_tf32):
    _ensure_loaded()
    return torch.ops.fusedops.conv2d_fwd_cuda.default(
        input, weight, bias, residual, stride_h, stride_w, pad_h, pad_w, dilation_h,
        dilation_w, out_h, out_w, groups, activation, out_channels_last, allow_tf32)


def conv2d_bwd(grad_out, input, weight, saved, stride_h, stride_w, pad_h, pad_w, dilation_h,
               dilation_w, out_h, out_w, groups, activation, allow_tf32, needs_input_grad,
               needs_weight_grad, needs_bias_grad, needs_preact_grad):
    _ensure_loaded()
    return torch.ops.fusedops.conv2d_bwd_cuda.default(
        grad_out, input, weight, saved, stride_h, stride_w, pad_h, pad_w, dilation_h,
        dilation_w, out_h, out_w, groups, activation, allow_tf32, needs_input_grad,
        needs_weight_grad, needs_bias_grad, needs_preact_grad)
