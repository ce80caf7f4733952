"""fusedops.cross_entropy: F.cross_entropy's semantics, plus z_loss and softcap.

The path of one call: check the arguments once, here (a ValueError/TypeError naming the
argument and the rule, before any launch) → flatten to ``(rows, C)`` logits and ``(rows,)``
targets → ``dispatch.select`` picks a tier → ``CrossEntropyFunction`` runs the tier's
``ce_fwd``, saving only the per-row log-sum-exp → the reduction, in plain torch ops
(autograd folds its 1/denominator into the per-row upstream gradient) → on backward the
tier's ``ce_bwd``.

Autocast runs F.cross_entropy in float32. The kernels already compute in float32 from the
low-precision logits, so under autocast the result is returned in float32 without making
the float32 copy of the logits that autocast itself would make.
"""

from __future__ import annotations

import math
import os

import torch

from fusedops import dispatch
from fusedops._autograd import once_differentiable_op
from fusedops.dispatch import contract

_REDUCTIONS = ("mean", "sum", "none")
_LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int64, torch.int32, torch.uint8)


def _fail(exc_type, message):
    raise exc_type(f"fusedops.cross_entropy: {message}")


def _check_arguments(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                     softcap, inplace_backward):
    if not isinstance(input, torch.Tensor):
        _fail(TypeError, f"input must be a Tensor, got {type(input).__name__}")
    if not isinstance(target, torch.Tensor):
        _fail(TypeError, f"target must be a Tensor, got {type(target).__name__}")
    if input.dtype not in _LOGIT_DTYPES:
        _fail(TypeError, f"input must be float16, bfloat16, float32 or float64, got {input.dtype}")
    if input.dim() == 0:
        _fail(ValueError, "input must have at least 1 dimension (C,), (N, C) or (N, C, d1, ...)")
    num_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if num_classes == 0:
        _fail(ValueError, f"input has 0 classes (shape {tuple(input.shape)})")
    if target.device != input.device:
        _fail(ValueError, f"target is on {target.device} but input is on {input.device}")
    if target.is_floating_point():
        if target.shape != input.shape:
            _fail(ValueError, f"a probability target must have input's shape "
                              f"{tuple(input.shape)}, got {tuple(target.shape)}")
    else:
        if target.dtype not in _INDEX_DTYPES:
            _fail(TypeError, f"class-index target must be int64, int32 or uint8, "
                             f"got {target.dtype}")
        expected = input.shape[:1] + input.shape[2:] if input.dim() > 1 else torch.Size([])
        if target.shape != expected:
            _fail(ValueError, f"class-index target must have shape {tuple(expected)} for input "
                              f"of shape {tuple(input.shape)}, got {tuple(target.shape)}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            _fail(TypeError, f"weight must be a Tensor or None, got {type(weight).__name__}")
        if not weight.is_floating_point():
            _fail(TypeError, f"weight must be floating point, got {weight.dtype}")
        if weight.shape != (num_classes,):
            _fail(ValueError, f"weight must have shape ({num_classes},) (one per class), "
                              f"got {tuple(weight.shape)}")
        if weight.device != input.device:
            _fail(ValueError, f"weight is on {weight.device} but input is on {input.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        _fail(TypeError, f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in _REDUCTIONS:
        _fail(ValueError, f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        _fail(ValueError, f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if (not isinstance(z_loss, (int, float)) or not math.isfinite(z_loss) or z_loss < 0):
        _fail(ValueError, f"z_loss must be a finite float >= 0, got {z_loss!r}")
    if softcap is not None and (not isinstance(softcap, (int, float))
                                or not math.isfinite(softcap) or softcap <= 0):
        _fail(ValueError, f"softcap must be None or a finite float > 0, got {softcap!r}")
    if not isinstance(inplace_backward, bool):
        _fail(TypeError, f"inplace_backward must be a bool, got {inplace_backward!r}")


def mean_denominator(target, weight, ignore_index, num_classes, dtype):
    """torch's "mean" divisor, on the device: the class weights of the counted rows summed
    (their count without weights). A class out of range is clamped here; its row is NaN."""
    counted = target != ignore_index
    if weight is None:
        return counted.sum().to(dtype)
    safe = torch.where(counted, target, torch.zeros_like(target)).clamp(0, num_classes - 1)
    return torch.where(counted, weight[safe.long()], weight.new_zeros(())).sum()


class CrossEntropyFunction(torch.autograd.Function):
    """Per-row losses of class-index targets: one ce_fwd launch forward, one ce_bwd back."""

    @staticmethod
    def forward(ctx, logits, target, weight, tier_name, ignore_index, label_smoothing, z_loss,
                softcap, inplace_backward):
        tier = dispatch.TIERS[tier_name]
        loss, lse = tier.ce_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss,
                                softcap)
        # Under no_grad autograd drops ctx right away, so nothing stays saved.
        ctx.save_for_backward(logits, target, weight, lse)
        ctx.options = (tier_name, ignore_index, label_smoothing, z_loss, softcap,
                       inplace_backward)
        return loss

    @staticmethod
    @once_differentiable_op("cross_entropy")
    def backward(ctx, grad_loss):
        logits, target, weight, lse = ctx.saved_tensors
        tier_name, ignore_index, label_smoothing, z_loss, softcap, inplace = ctx.options
        grad_loss = grad_loss.to(lse.dtype).contiguous()
        grad = dispatch.TIERS[tier_name].ce_bwd(logits, target, weight, lse, grad_loss,
                                                ignore_index, label_smoothing, z_loss, softcap,
                                                inplace)
        return grad, None, None, None, None, None, None, None, None


class CrossEntropyProbsFunction(torch.autograd.Function):
    """Per-row losses of class-probability targets (torch tier), with the target's gradient."""

    @staticmethod
    def forward(ctx, logits, target, weight, tier_name, label_smoothing, z_loss, softcap):
        tier = dispatch.TIERS[tier_name]
        loss, lse = tier.ce_probs_fwd(logits, target, weight, label_smoothing, z_loss, softcap)
        ctx.save_for_backward(logits, target, weight, lse)
        ctx.options = (tier_name, label_smoothing, z_loss, softcap)
        return loss

    @staticmethod
    @once_differentiable_op("cross_entropy")
    def backward(ctx, grad_loss):
        logits, target, weight, lse = ctx.saved_tensors
        tier_name, *options = ctx.options
        grad_logits, grad_target = dispatch.TIERS[tier_name].ce_probs_bwd(
            logits, target, weight, lse, grad_loss, *options)
        return grad_logits, grad_target, None, None, None, None, None


def cross_entropy(input, target, weight=None, *, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, z_loss=0.0, softcap=None, inplace_backward=False):
    """``F.cross_entropy`` fused: one read of the logits forward, one read and one write back.

    Same arguments, values, gradients and output dtype as ``torch.nn.functional.cross_entropy``,
    plus:

    * ``z_loss``: adds ``z_loss * lse**2`` to each non-ignored row's loss before its class
      weight multiplies it (so "mean" divides it by torch's denominator too).
    * ``softcap``: logits become ``softcap * tanh(logits / softcap)`` first.
    * ``inplace_backward=True``: backward writes the gradient over the input's storage (for
      (N, C) and (C,) inputs; the caller promises not to read the logits again). Otherwise
      the input is never modified.

    A class target outside ``[0, C)`` that is not ``ignore_index`` gives NaN for its row on the
    GPU (no out-of-bounds access); on CPU, or with ``FUSEDOPS_DEBUG=1``, it raises ValueError.
    Class-probability targets run on the torch tier.
    """
    _check_arguments(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                     softcap, inplace_backward)
    label_smoothing, z_loss = float(label_smoothing), float(z_loss)
    softcap = float(softcap) if softcap is not None else 0.0
    out_dtype = input.dtype
    if torch.is_autocast_enabled(input.device.type) and input.dtype != torch.float64:
        out_dtype = torch.float32  # autocast runs cross_entropy in float32

    num_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    probability_target = target.is_floating_point()
    if input.dim() == 1:
        logits = input.unsqueeze(0)
        target = target.unsqueeze(0)
    elif input.dim() == 2:
        logits = input
    else:  # (N, C, d1, ...): classes last. This copies; the kernels need C contiguous.
        logits = input.movedim(1, -1).reshape(-1, num_classes)
        target = target.movedim(1, -1) if probability_target else target
    target = target.reshape(logits.shape[0], -1) if probability_target else target.reshape(-1)
    if not probability_target and target.dtype == torch.uint8:
        target = target.to(torch.int32)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    acc = contract.accumulation_dtype(logits.dtype)
    if weight is not None:
        weight = weight.to(acc).contiguous()

    if probability_target:
        # Only the torch tier covers probability targets: this raises if another is forced.
        tier = dispatch.select("cross_entropy", logits.device, lambda t: t.ce_unsupported(
            logits, target, probability_target=True))
        row_loss = CrossEntropyProbsFunction.apply(logits, target, weight, tier.NAME,
                                                   label_smoothing, z_loss, softcap)
        denominator = logits.shape[0]
    else:
        if logits.device.type == "cuda" and os.environ.get("FUSEDOPS_DEBUG") == "1":
            contract.check_targets_in_range(target, num_classes, ignore_index)  # host sync
        tier = dispatch.select("cross_entropy", logits.device, lambda t: t.ce_unsupported(
            logits, target, probability_target=False))
        row_loss = CrossEntropyFunction.apply(logits, target, weight, tier.NAME, ignore_index,
                                                 label_smoothing, z_loss, softcap,
                                                 inplace_backward)
        denominator = None
        if reduction == "mean":
            denominator = mean_denominator(target, weight, ignore_index, num_classes, acc)

    if reduction == "none":
        batch_shape = input.shape[:1] + input.shape[2:] if input.dim() > 1 else torch.Size([])
        return row_loss.reshape(batch_shape).to(out_dtype)
    total = row_loss.sum()
    if reduction == "mean":
        total = total / denominator
    return total.to(out_dtype)
