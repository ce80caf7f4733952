"""fusedops.linear: ``act(F.linear(input, weight, bias) + residual)`` in one GEMM with an epilogue.

The path of one call: check the arguments once, here → flatten the leading dimensions to
``(M, K)`` → ``dispatch.select`` picks a tier → ``LinearFunction`` runs the tier's
``linear_fwd`` (bias, residual and activation applied to the accumulator before the single
store) → on backward the tier's ``linear_bwd``, which forms ``dz = grad_out * act'(z)`` inside
its GEMMs.

What backward keeps (linear_contract.SAVES): nothing beyond the inputs for no activation; the
output itself for relu; the pre-activation ``z`` (one more output-sized tensor, in the
output's dtype) for gelu, gelu_tanh and silu — saved rather than recomputed, because
recomputing it costs a whole forward GEMM.

float32 inputs use tf32 tensor cores exactly when torch's matmuls would
(``torch.get_float32_matmul_precision() != "highest"``). Under autocast the inputs are cast
to autocast's dtype as autocast casts F.linear, the residual too, and the output has that
dtype.
"""

from __future__ import annotations

import torch

from fusedops import dispatch
from fusedops._autograd import once_differentiable_op
from fusedops._compile import assume_constant_result
from fusedops.dispatch import linear_contract
from fusedops.ops._autocast import cast_like_autocast

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ACTIVATIONS = (None, *(name for name in linear_contract.ACTIVATIONS if name != "none"))


def _fail(exc_type, message):
    raise exc_type(f"fusedops.linear: {message}")


def check_activation(activation) -> str:
    """The contract's name for ``activation`` (None → "none"), or a ValueError."""
    if activation is not None and not isinstance(activation, str):
        _fail(TypeError, f"activation must be None or a string, got {activation!r}")
    if activation not in _ACTIVATIONS:
        _fail(ValueError, f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    return "none" if activation is None else activation


def _check_arguments(input, weight, bias, residual):
    for name, tensor in (("input", input), ("weight", weight)):
        if not isinstance(tensor, torch.Tensor):
            _fail(TypeError, f"{name} must be a Tensor, got {type(tensor).__name__}")
    if input.dtype not in _DTYPES:
        _fail(TypeError, f"input must be float16, bfloat16, float32 or float64, got {input.dtype}")
    if input.dim() == 0:
        _fail(ValueError, "input must have at least 1 dimension (K,) or (..., K)")
    if weight.dim() != 2:
        _fail(ValueError, f"weight must be 2-D (out_features, in_features), got shape "
                          f"{tuple(weight.shape)}")
    if weight.shape[1] != input.shape[-1]:
        _fail(ValueError, f"input's last dimension ({input.shape[-1]}) must equal weight's "
                          f"in_features ({weight.shape[1]}); shapes {tuple(input.shape)} and "
                          f"{tuple(weight.shape)}")
    out_shape = (*input.shape[:-1], weight.shape[0])
    for name, tensor, shape in (("weight", weight, None), ("bias", bias, (weight.shape[0],)),
                                ("residual", residual, out_shape)):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            _fail(TypeError, f"{name} must be a Tensor or None, got {type(tensor).__name__}")
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            _fail(ValueError, f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
        if tensor.dtype != input.dtype:
            _fail(TypeError, f"{name} has dtype {tensor.dtype} but input has {input.dtype}")
        if tensor.device != input.device:
            _fail(ValueError, f"{name} is on {tensor.device} but input is on {input.device}")


# torch.compile bakes the setting in at trace time, as Inductor does for torch's own matmuls.
@assume_constant_result
def allow_tf32() -> bool:
    """Whether torch would run a float32 matmul on tf32 tensor cores now."""
    return torch.get_float32_matmul_precision() != "highest"


def linear_unsupported(tier, input, weight, bias, residual, activation):
    covers = getattr(tier, "linear_unsupported", None)
    if covers is None:
        return f"the {tier.NAME} tier has no fused linear yet"
    return covers(input, weight, bias, residual, activation)


class LinearFunction(torch.autograd.Function):
    """One linear_fwd launch forward; one linear_bwd back (dz formed inside its GEMMs)."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, tier_name, activation, tf32):
        tier = dispatch.TIERS[tier_name]
        out, saved = tier.linear_fwd(input, weight, bias, residual, activation, tf32)
        if linear_contract.SAVES[activation] == "out":
            saved = out
        ctx.save_for_backward(input, weight, saved)
        ctx.options = (tier_name, activation, tf32, bias is not None, residual is not None)
        return out

    @staticmethod
    @once_differentiable_op("linear")
    def backward(ctx, grad_out):
        input, weight, saved = ctx.saved_tensors
        tier_name, activation, tf32, has_bias, has_residual = ctx.options
        needs = ctx.needs_input_grad
        grads = dispatch.TIERS[tier_name].linear_bwd(
            grad_out.contiguous(), input, weight, saved, activation, tf32, needs[0], needs[1],
            has_bias and needs[2], has_residual and needs[3])
        wanted = (needs[0], needs[1], has_bias and needs[2], has_residual and needs[3])
        grad_input, grad_weight, grad_bias, grad_residual = (
            grad if want else None for grad, want in zip(grads, wanted))
        return grad_input, grad_weight, grad_bias, grad_residual, None, None, None


def linear(input, weight, bias=None, *, activation=None, residual=None):
    """``act(F.linear(input, weight, bias) + residual)`` fused: one GEMM, the rest in its epilogue.

    ``input`` ``(K,)`` or ``(..., K)``, ``weight`` ``(N, K)``, ``bias`` ``(N,)``, ``residual``
    shaped like the output; ``activation`` one of None, "relu", "gelu", "gelu_tanh", "silu".
    Gradients flow to input, weight, bias and residual.
    """
    activation = check_activation(activation)
    if isinstance(input, torch.Tensor):
        input, weight, bias, residual = cast_like_autocast(input.device.type, input, weight,
                                                           bias, residual)
    _check_arguments(input, weight, bias, residual)
    features = weight.shape[0]
    out_shape = (*input.shape[:-1], features)
    num_rows = input.shape[:-1].numel()  # not reshape(-1, K): K may be 0
    rows = input.reshape(num_rows, input.shape[-1])
    residual_rows = residual.reshape(num_rows, features) if residual is not None else None
    tier = dispatch.select("linear", input.device, lambda t: linear_unsupported(
        t, rows, weight, bias, residual_rows, activation))
    out = LinearFunction.apply(rows, weight, bias, residual_rows, tier.NAME, activation,
                               allow_tf32() and input.dtype == torch.float32)
    return out.reshape(out_shape)
