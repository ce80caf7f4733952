"""fusedops.conv2d: ``act(F.conv2d(input, weight, bias, ...) + residual)`` with one epilogue.

The path of one call: check the arguments once, here, the way F.conv2d reads them (int or
pair stride/padding/dilation, "same" and "valid", torch's uneven "same" split with the extra
row and column at the bottom and right) → the geometry as the contract takes it (top/left
padding and the output size) → ``dispatch.select`` picks a tier → ``ConvFunction`` runs the
tier's ``conv2d_fwd`` (bias, residual and activation applied to the accumulator before the
single store) → on backward the tier's ``conv2d_bwd``, which forms ``dz = grad_out * act'(z)``
inside its kernels.

The output's memory format is the one F.conv2d would give: channels_last when the input or
the weight is channels_last, else contiguous. float32 uses tf32 tensor cores exactly when
torch's cuDNN convolutions would (``torch.backends.cudnn.allow_tf32``). Under autocast the
inputs are cast as autocast casts F.conv2d, the residual too.
"""

from __future__ import annotations

import numbers

import torch
from torch._prims_common import suggest_memory_format

from fusedops import dispatch
from fusedops._autograd import once_differentiable_op
from fusedops._compile import assume_constant_result
from fusedops.dispatch import linear_contract
from fusedops.ops._autocast import cast_like_autocast

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ACTIVATIONS = (None, *(name for name in linear_contract.ACTIVATIONS if name != "none"))
_OP = "conv2d"


def _fail(exc_type, message):
    raise exc_type(f"fusedops.conv2d: {message}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _pair(name, value, minimum) -> tuple[int, int]:
    if _is_int(value):
        value = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 1:  # F.conv2d expands (s,) too
        value = (value[0], value[0])
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(_is_int(v) for v in value)):
        _fail(TypeError, f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in value):
        _fail(ValueError, f"{name} must be >= {minimum}, got {tuple(value)}")
    return int(value[0]), int(value[1])


def _padding(padding, stride, dilation, kernel_size):
    """(top, bottom, left, right) as F.conv2d pads."""
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding != "same":
            _fail(ValueError, f"padding must be an int, a pair, 'same' or 'valid', got "
                              f"{padding!r}")
        if stride != (1, 1):
            _fail(ValueError, "padding='same' is not supported for strided convolutions")
        sides = []
        for dil, size in zip(dilation, kernel_size):
            total = dil * (size - 1)
            sides += [total // 2, total - total // 2]  # torch puts the odd one at the end
        return tuple(sides)
    pad_h, pad_w = _pair("padding", padding, 0)
    return pad_h, pad_h, pad_w, pad_w


def check_activation(activation) -> str:
    if activation is not None and not isinstance(activation, str):
        _fail(TypeError, f"activation must be None or a string, got {activation!r}")
    if activation not in _ACTIVATIONS:
        _fail(ValueError, f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    return "none" if activation is None else activation


def _check_tensors(input, weight, bias, residual, groups):
    for name, tensor in (("input", input), ("weight", weight)):
        if not isinstance(tensor, torch.Tensor):
            _fail(TypeError, f"{name} must be a Tensor, got {type(tensor).__name__}")
    if input.dim() not in (3, 4):
        _fail(ValueError, f"input must be 4-D (N, C, H, W) or 3-D (C, H, W), got shape "
                          f"{tuple(input.shape)}")
    if weight.dim() != 4:
        _fail(ValueError, f"weight must be 4-D (out_channels, in_channels / groups, kH, kW), "
                          f"got shape {tuple(weight.shape)}")
    if input.dtype not in _DTYPES:
        _fail(TypeError, f"input must be float16, bfloat16, float32 or float64, got "
                         f"{input.dtype}")
    if not _is_int(groups):
        _fail(TypeError, f"groups must be an int, got {groups!r}")
    if groups < 1:
        _fail(ValueError, f"groups must be a positive int, got {groups!r}")
    channels = input.shape[-3]
    if channels == 0:
        _fail(ValueError, f"input of shape {tuple(input.shape)} has no channels")
    if channels % groups or weight.shape[0] % groups:
        _fail(ValueError, f"in_channels ({channels}) and out_channels ({weight.shape[0]}) must "
                          f"be divisible by groups ({groups})")
    if weight.shape[1] * groups != channels:
        _fail(ValueError, f"input has {channels} channels but weight expects "
                          f"{weight.shape[1] * groups} (weight.shape[1] = {weight.shape[1]} "
                          f"x groups = {groups})")
    if weight.shape[0] == 0 or weight.shape[2] == 0 or weight.shape[3] == 0:
        _fail(ValueError, f"weight of shape {tuple(weight.shape)} has an empty dimension")
    for name, tensor in (("weight", weight), ("bias", bias), ("residual", residual)):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            _fail(TypeError, f"{name} must be a Tensor or None, got {type(tensor).__name__}")
        if tensor.dtype != input.dtype:
            _fail(TypeError, f"{name} has dtype {tensor.dtype} but input has {input.dtype}")
        if tensor.device != input.device:
            _fail(ValueError, f"{name} is on {tensor.device} but input is on {input.device}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        _fail(ValueError, f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


# torch.compile bakes the setting in at trace time, as Inductor does for torch's own convs.
@assume_constant_result
def allow_tf32() -> bool:
    """Whether torch would run a float32 convolution on tf32 tensor cores now."""
    return torch.backends.cudnn.allow_tf32


def _channels_last(tensor) -> bool:
    """F.conv2d's reading of a 4-D tensor's layout (torch's suggest_memory_format: the
    strides decide, also for the ambiguous shapes with one channel or a 1x1 kernel)."""
    return suggest_memory_format(tensor) == torch.channels_last


def conv_unsupported(tier, input, weight, bias, residual, groups, activation):
    covers = getattr(tier, "conv2d_unsupported", None)
    if covers is None:
        return f"the {tier.NAME} tier has no fused convolution yet"
    return covers(input, weight, bias, residual, groups, activation)


class ConvFunction(torch.autograd.Function):
    """One conv2d_fwd launch forward; one conv2d_bwd back (dz formed inside its kernels)."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, geometry, activation, channels_last,
                tier_name, tf32):
        tier = dispatch.TIERS[tier_name]
        out, saved = tier.conv2d_fwd(input, weight, bias, residual, *geometry, activation,
                                     channels_last, tf32)
        if linear_contract.SAVES[activation] == "out":
            saved = out
        ctx.save_for_backward(input, weight, saved)
        ctx.options = (geometry, activation, tier_name, tf32, bias is not None,
                       residual is not None)
        return out

    @staticmethod
    @once_differentiable_op("conv2d")
    def backward(ctx, grad_out):
        input, weight, saved = ctx.saved_tensors
        geometry, activation, tier_name, tf32, has_bias, has_residual = ctx.options
        needs = ctx.needs_input_grad
        wanted = (needs[0], needs[1], has_bias and needs[2], has_residual and needs[3])
        grads = dispatch.TIERS[tier_name].conv2d_bwd(grad_out, input, weight, saved, *geometry,
                                                     activation, tf32, *wanted)
        grads = tuple(grad if want else None for grad, want in zip(grads, wanted))
        return (*grads, None, None, None, None, None)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
           activation=None, residual=None):
    """``act(F.conv2d(input, weight, bias, stride, padding, dilation, groups) + residual)``.

    ``input`` ``(N, C, H, W)`` or ``(C, H, W)``, ``weight`` ``(K, C / groups, kH, kW)``,
    ``bias`` ``(K,)``; stride, padding (int, pair, "same", "valid") and dilation as F.conv2d
    takes them; ``residual`` shaped like the output, in any memory format; ``activation``
    one of None, "relu", "gelu", "gelu_tanh", "silu". Gradients flow to all four tensors.
    """
    activation = check_activation(activation)
    if isinstance(input, torch.Tensor):
        input, weight, bias, residual = cast_like_autocast(input.device.type, input, weight,
                                                           bias, residual)
    _check_tensors(input, weight, bias, residual, groups)
    stride = _pair("stride", stride, 1)
    dilation = _pair("dilation", dilation, 1)
    top, bottom, left, right = _padding(padding, stride, dilation, weight.shape[2:])
    height, width = input.shape[-2:]
    out_h = (height + top + bottom - dilation[0] * (weight.shape[2] - 1) - 1) // stride[0] + 1
    out_w = (width + left + right - dilation[1] * (weight.shape[3] - 1) - 1) // stride[1] + 1
    if out_h < 1 or out_w < 1:
        _fail(ValueError, f"the output would be {out_h} x {out_w}: the (padded) input "
                          f"{height + top + bottom} x {width + left + right} is smaller than "
                          f"the dilated kernel")
    unbatched = input.dim() == 3
    out_shape = (*input.shape[:-3], weight.shape[0], out_h, out_w)
    if residual is not None and tuple(residual.shape) != out_shape:
        _fail(ValueError, f"residual must have the output's shape {out_shape}, got "
                          f"{tuple(residual.shape)}")
    if unbatched:
        input = input.unsqueeze(0)
        residual = residual.unsqueeze(0) if residual is not None else None
    channels_last = _channels_last(input) or _channels_last(weight)
    tier = dispatch.select(_OP, input.device, lambda t: conv_unsupported(
        t, input, weight, bias, residual, groups, activation))
    geometry = (*stride, top, left, *dilation, out_h, out_w, groups)
    # tf32 is a property of CUDA tensor cores: on CPU torch's own convs never use it.
    tf32 = allow_tf32() and input.dtype == torch.float32 and input.device.type == "cuda"
    out = ConvFunction.apply(input, weight, bias, residual, geometry, activation, channels_last,
                             tier.NAME, tf32)
    return out.squeeze(0) if unbatched else out
