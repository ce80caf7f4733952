"""The torch tier: the kernel-level contract in plain torch ops (no autograd).

It is the CPU path, the fallback for cases no kernel covers, and the oracle the kernels are
tested against (it is itself tested against torch's own ops in float64). It computes in the
accumulation dtype (float32, float64 for float64 inputs), so unlike the kernels it does
materialise an upcast copy of the logits: it is the reference, not the fast path.
"""

from __future__ import annotations

import torch

from fusedops.dispatch import contract, linear_contract

NAME = "torch"


def availability() -> str | None:
    """None: this tier is always available."""
    return None


def ce_unsupported(logits: torch.Tensor, target: torch.Tensor, *, probability_target: bool
                   ) -> str | None:
    return None


def softcapped(x: torch.Tensor, softcap: float) -> torch.Tensor:
    return softcap * torch.tanh(x / softcap) if softcap else x


def _row_terms(logits, target, weight, ignore_index):
    """Shared by forward and backward: z's dtype, which rows count, the clamped targets."""
    num_classes = logits.shape[1]
    if logits.device.type == "cpu":
        # On CPU checking costs no device sync, so a bad class is an error, not a NaN row.
        contract.check_targets_in_range(target, num_classes, ignore_index)
    target = target.long()
    counted = target != ignore_index
    in_range = (target >= 0) & (target < num_classes)
    safe_target = torch.where(counted & in_range, target, torch.zeros_like(target))
    acc = contract.accumulation_dtype(logits.dtype)
    if weight is None:
        target_weight = torch.ones(target.shape, dtype=acc, device=logits.device)
    else:
        target_weight = weight.to(acc)[safe_target]
    out_of_range = counted & ~in_range
    return acc, counted, out_of_range, safe_target, target_weight


def _ce_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap):
    num_classes = logits.shape[1]
    acc, counted, out_of_range, safe_target, target_weight = _row_terms(
        logits, target, weight, ignore_index)
    z = softcapped(logits.to(acc), softcap)
    lse = torch.logsumexp(z, dim=1)
    z_target = z.gather(1, safe_target[:, None])[:, 0]
    loss = target_weight * ((1.0 - label_smoothing) * (lse - z_target) + z_loss * lse * lse)
    if label_smoothing:
        if weight is None:
            smooth = num_classes * lse - z.sum(dim=1)
        else:
            smooth = ((lse[:, None] - z) * weight.to(acc)).sum(dim=1)
        loss = loss + (label_smoothing / num_classes) * smooth
    loss = torch.where(counted, loss, torch.zeros_like(loss))
    loss = torch.where(out_of_range, torch.full_like(loss, float("nan")), loss)
    return loss, lse


def _ce_bwd(logits, target, weight, lse, grad_loss, ignore_index, label_smoothing, z_loss,
            softcap, out):
    num_classes = logits.shape[1]
    acc, counted, out_of_range, safe_target, target_weight = _row_terms(
        logits, target, weight, ignore_index)
    z = softcapped(logits.to(acc), softcap)
    lse = lse.to(acc)
    p = torch.exp(z - lse[:, None])
    # p - onehot(t) first, then the scales: a confident row (p_t ~ 1) keeps its digits.
    # (A comparison, not scatter_add: deterministic on every device.)
    is_target = torch.arange(num_classes, device=p.device) == safe_target[:, None]
    p_minus_onehot = torch.where(is_target, p - 1.0, p)
    grad = target_weight[:, None] * ((1.0 - label_smoothing) * p_minus_onehot
                                     + (2.0 * z_loss * lse)[:, None] * p)
    if label_smoothing:
        if weight is None:
            grad += (label_smoothing / num_classes) * (num_classes * p - 1.0)
        else:
            w = weight.to(acc)
            grad += (label_smoothing / num_classes) * (w.sum() * p - w)
    grad *= grad_loss.to(acc)[:, None]
    grad = torch.where(counted[:, None], grad, torch.zeros_like(grad))
    grad = torch.where(out_of_range[:, None], torch.full_like(grad, float("nan")), grad)
    if softcap:
        grad *= 1.0 - (z / softcap) ** 2
    out.copy_(grad)


ce_fwd, ce_bwd = contract.tier_functions(
    contract.register_cross_entropy_ops(NAME, _ce_fwd, _ce_bwd))


# --- probability targets (this tier only) -------------------------------------------------
# torch's semantics: with y' = (1 - eps) * y + eps / C, loss_i = sum_c w_c y'_c (lse - z_c);
# z_loss adds z_loss * lse**2 per row; "mean" divides by the number of rows.


def ce_probs_fwd(logits, target, weight, label_smoothing, z_loss, softcap):
    acc = contract.accumulation_dtype(logits.dtype)
    z = softcapped(logits.to(acc), softcap)
    lse = torch.logsumexp(z, dim=1)
    y = _smoothed(target.to(acc), label_smoothing)
    if weight is not None:
        y = y * weight.to(acc)
    loss = (y * (lse[:, None] - z)).sum(dim=1) + z_loss * lse * lse
    return loss, lse


def ce_probs_bwd(logits, target, weight, lse, grad_loss, label_smoothing, z_loss, softcap):
    """Returns (grad_logits, grad_target), each in its input's dtype."""
    acc = contract.accumulation_dtype(logits.dtype)
    z = softcapped(logits.to(acc), softcap)
    lse = lse.to(acc)
    g = grad_loss.to(acc)[:, None]
    wy = _smoothed(target.to(acc), label_smoothing)
    w = weight.to(acc) if weight is not None else None
    if w is not None:
        wy = wy * w
    p = torch.exp(z - lse[:, None])
    grad_z = (wy.sum(dim=1, keepdim=True) + 2.0 * z_loss * lse[:, None]) * p - wy
    grad_logits = g * grad_z
    if softcap:
        grad_logits = grad_logits * (1.0 - (z / softcap) ** 2)
    grad_target = (1.0 - label_smoothing) * g * (lse[:, None] - z)
    if w is not None:
        grad_target = grad_target * w
    return grad_logits.to(logits.dtype), grad_target.to(target.dtype)


def _smoothed(y, label_smoothing):
    return y * (1.0 - label_smoothing) + label_smoothing / y.shape[1] if label_smoothing else y


# --- fused linear (see linear_contract.py) -------------------------------------------------


def activation_forward(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "none":
        return z
    if activation == "relu":
        return torch.relu(z)
    if activation == "gelu":
        return torch.nn.functional.gelu(z)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(z, approximate="tanh")
    if activation == "silu":
        return torch.nn.functional.silu(z)
    raise ValueError(f"unknown activation {activation!r}")


def activation_derivative(saved: torch.Tensor, activation: str) -> torch.Tensor:
    """act'(z) from what linear_fwd saved (z, or out for relu), in saved's dtype."""
    z = saved
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "gelu":  # x * Phi(x): Phi(x) + x * phi(x)
        cdf = 0.5 * (1.0 + torch.erf(z * 0.7071067811865476))
        pdf = torch.exp(-0.5 * z * z) * 0.3989422804014327
        return cdf + z * pdf
    if activation == "gelu_tanh":  # 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)
        k = 0.7978845608028654
        u = k * (z + 0.044715 * z**3)
        t = torch.tanh(u)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * k * (1.0 + 3 * 0.044715 * z * z)
    if activation == "silu":  # x * sigmoid(x): s (1 + x (1 - s))
        s = torch.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    raise ValueError(f"unknown activation {activation!r}")


def linear_unsupported(input, weight, bias, residual, activation) -> str | None:
    return None


def _linear_fwd(input, weight, bias, residual, activation, allow_tf32):
    acc = contract.accumulation_dtype(input.dtype)
    z = input.to(acc) @ weight.to(acc).T
    if bias is not None:
        z = z + bias.to(acc)
    if residual is not None:
        z = z + residual.to(acc)
    out = activation_forward(z, activation).to(input.dtype)
    if linear_contract.saves_preactivation(activation):
        return out, z.to(input.dtype)
    return out, input.new_empty((0,))


def _linear_bwd(grad_out, input, weight, saved, activation, allow_tf32, needs_input_grad,
                needs_weight_grad, needs_bias_grad, needs_preact_grad):
    acc = contract.accumulation_dtype(input.dtype)
    dz = grad_out.to(acc)
    if activation != "none":
        dz = dz * activation_derivative(saved.to(acc), activation)
    def empty():  # a fresh one each time: custom-op outputs may not alias each other
        return input.new_empty((0,))

    grad_input = (dz @ weight.to(acc)).to(input.dtype) if needs_input_grad else empty()
    grad_weight = (dz.T @ input.to(acc)).to(weight.dtype) if needs_weight_grad else empty()
    grad_bias = dz.sum(dim=0).to(weight.dtype) if needs_bias_grad else empty()
    grad_preact = dz.to(grad_out.dtype, copy=True) if needs_preact_grad else empty()
    return grad_input, grad_weight, grad_bias, grad_preact


def _linear_weight_grad_accumulate(grad_out, input, grad_weight, grad_bias, allow_tf32):
    acc = torch.promote_types(contract.accumulation_dtype(input.dtype), grad_weight.dtype)
    grad_weight.add_(grad_out.to(acc).T @ input.to(acc))
    if grad_bias is not None:
        grad_bias.add_(grad_out.to(acc).sum(dim=0))


linear_ops = linear_contract.register_linear_ops(NAME, _linear_fwd, _linear_bwd,
                                                 _linear_weight_grad_accumulate)
linear_fwd, linear_bwd = linear_ops.fwd, linear_ops.bwd
linear_weight_grad_accumulate = linear_ops.weight_grad_accumulate
