"""The torch tier: the kernel-level contract in plain torch ops (no autograd).

It is the CPU path, the fallback for cases no kernel covers, and the oracle the kernels are
tested against (it is itself tested against torch's own ops in float64). It computes in the
accumulation dtype (float32, float64 for float64 inputs), so unlike the kernels it does
materialise an upcast copy of the logits: it is the reference, not the fast path.
"""

from __future__ import annotations

import torch

from fusedops.dispatch import contract

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
