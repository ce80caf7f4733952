"""The torch tier: the kernel-level contract in plain torch ops (no autograd).

It is the CPU path, the fallback for cases no kernel covers, and the oracle the kernels are
tested against (it is itself tested against torch's own ops in float64). It computes in the
accumulation dtype (float32, float64 for float64 inputs), so unlike the kernels it does
materialise an upcast copy of the logits: it is the reference, not the fast path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedops.dispatch import attention_contract, contract, conv_contract, linear_contract

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


# --- attention (see attention_contract.py) ----------------------------------------------
# Materialises the scores of a chunk of query rows at a time (O(rows x Sk) memory, not
# O(Sq x Sk)), computes the log-sum-exp from them and recomputes it in backward rather than
# trusting the saved float32 one, so float64 inputs give a float64-exact oracle.

_ATTENTION_CHUNK_ELEMENTS = 1 << 25  # score elements per chunk of query rows


def attention_unsupported(q, k, v, packed: bool) -> str | None:
    return None


def _batched(q, k, v, packed):
    """Packed (T, H, D) tensors as one batch (1, H, T, D); batched ones as they are."""
    if packed:
        return tuple(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    return q, k, v


def _packed_positions(cu_seqlens, rows):
    """Each row's sequence, its position in it and the sequence length; valid=False for a row
    outside every sequence (possible only with malformed cu_seqlens)."""
    cu = cu_seqlens.long()
    batch = cu.numel() - 1
    seq = torch.searchsorted(cu[1:], rows, right=True).clamp(max=max(batch - 1, 0))
    start, end = cu[seq], cu[seq + 1]
    valid = (rows >= start) & (rows < end) if batch > 0 else torch.zeros_like(rows, dtype=bool)
    return seq, rows - start, end - start, valid


def _visible(cu_q, cu_k, seqlen_q, seqlen_k, row0, row1, left, right, device):
    """(row1 - row0, Sk) bool: which keys each query row in [row0, row1) sees."""
    rows = torch.arange(row0, row1, device=device)
    keys = torch.arange(seqlen_k, device=device)
    if cu_q is None:
        position = (rows + (seqlen_k - seqlen_q))[:, None]
        key = keys[None, :]
        same = True
    else:
        seq_q, pos_q, len_q, valid_q = _packed_positions(cu_q, rows)
        seq_k, pos_k, _, valid_k = _packed_positions(cu_k, keys)
        len_k = cu_k.long().diff()[seq_q] if cu_k.numel() > 1 else torch.zeros_like(seq_q)
        position = (pos_q + len_k - len_q)[:, None]
        key = pos_k[None, :]
        same = valid_q[:, None] & valid_k[None, :] & (seq_q[:, None] == seq_k[None, :])
    return same & (key >= position - left) & (key <= position + right)


def _grouped(x, heads_kv):
    """(B, Hq, r, D) -> (B, Hkv, G, r, D): the query heads of a group side by side."""
    group = x.shape[1] // heads_kv if heads_kv else 0  # zero heads: an empty (B, 0, 0, ...)
    return x.reshape(x.shape[0], heads_kv, group, *x.shape[2:])


def _attention_probabilities(q_rows, k, visible, scale):
    """softmax of the visible scaled scores (B, Hkv, G, r, Sk); all-zero rows see no key."""
    scores = _grouped(q_rows, k.shape[1]) @ k.unsqueeze(2).transpose(-1, -2) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.exp(scores - finite_lse), lse


def _row_chunks(q, seqlen_k):
    batch, heads, seqlen_q = q.shape[:3]
    step = max(1, _ATTENTION_CHUNK_ELEMENTS // max(1, batch * heads * seqlen_k))
    return [(r, min(r + step, seqlen_q)) for r in range(0, seqlen_q, step)]


def _attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                   window_left, window_right, allow_tf32):
    packed = attention_contract.is_packed(cu_seqlens_q)
    acc = contract.accumulation_dtype(q.dtype)
    qb, kb, vb = (t.to(acc) for t in _batched(q, k, v, packed))
    seqlen_q, seqlen_k = qb.shape[2], kb.shape[2]
    out = torch.empty(qb.shape, dtype=acc, device=q.device)
    lse = torch.empty(qb.shape[:3], dtype=torch.float32, device=q.device)
    for row0, row1 in _row_chunks(qb, seqlen_k):
        visible = _visible(cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, row0, row1,
                           window_left, window_right, q.device)
        probs, lse_rows = _attention_probabilities(qb[:, :, row0:row1], kb, visible, scale)
        out[:, :, row0:row1] = (probs @ vb.unsqueeze(2)).flatten(1, 2)
        lse[:, :, row0:row1] = lse_rows.squeeze(-1).flatten(1, 2)
    result = contract.new_output_like(q)
    result.copy_(out.squeeze(0).transpose(0, 1) if packed else out)
    return result, (lse.squeeze(0) if packed else lse).contiguous()


def _attention_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                   max_seqlen_k, scale, window_left, window_right, allow_tf32, deterministic):
    packed = attention_contract.is_packed(cu_seqlens_q)
    acc = contract.accumulation_dtype(q.dtype)
    qb, kb, vb = (t.to(acc) for t in _batched(q, k, v, packed))
    dout, outb, _ = (t.to(acc) for t in _batched(grad_out, out, out, packed))
    seqlen_q, seqlen_k = qb.shape[2], kb.shape[2]
    heads_kv = kb.shape[1]
    delta = (dout * outb).sum(-1, keepdim=True)  # rowsum(dO * O) = rowsum(P * dP)
    grad_q = torch.empty_like(qb)
    grad_k, grad_v = torch.zeros_like(kb), torch.zeros_like(vb)
    for row0, row1 in _row_chunks(qb, seqlen_k):
        visible = _visible(cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, row0, row1,
                           window_left, window_right, q.device)
        q_rows = qb[:, :, row0:row1]
        probs, _ = _attention_probabilities(q_rows, kb, visible, scale)
        dout_rows = _grouped(dout[:, :, row0:row1], heads_kv)
        grad_v += (probs.transpose(-1, -2) @ dout_rows).sum(2)
        grad_probs = dout_rows @ vb.unsqueeze(2).transpose(-1, -2)
        grad_scores = probs * (grad_probs - _grouped(delta[:, :, row0:row1], heads_kv)) * scale
        grad_q[:, :, row0:row1] = (grad_scores @ kb.unsqueeze(2)).flatten(1, 2)
        grad_k += (grad_scores.transpose(-1, -2) @ _grouped(q_rows, heads_kv)).sum(2)
    grads = []
    for grad, like in ((grad_q, q), (grad_k, k), (grad_v, v)):
        result = contract.new_output_like(like)
        result.copy_(grad.squeeze(0).transpose(0, 1) if packed else grad)
        grads.append(result)
    return tuple(grads)


attention_ops = attention_contract.register_attention_ops(NAME, _attention_fwd, _attention_bwd)
attention_fwd, attention_bwd = attention_ops.fwd, attention_ops.bwd


# --- fused convolution (see conv_contract.py) ---------------------------------------------


def conv2d_unsupported(input, weight, bias, residual, groups, activation) -> str | None:
    return None


def _explicitly_padded(x, weight, stride, pad, dilation, out_size):
    """``x`` padded by (top, left) = pad and at the bottom/right as far as out_size needs."""
    (pad_h, pad_w), (out_h, out_w) = pad, out_size
    reach_h = (out_h - 1) * stride[0] + dilation[0] * (weight.shape[2] - 1) + 1
    reach_w = (out_w - 1) * stride[1] + dilation[1] * (weight.shape[3] - 1) + 1
    bottom = max(0, reach_h - x.shape[2] - pad_h)
    right = max(0, reach_w - x.shape[3] - pad_w)
    return F.pad(x, (pad_w, right, pad_h, bottom))


def _conv2d_fwd(input, weight, bias, residual, stride_h, stride_w, pad_h, pad_w, dilation_h,
                dilation_w, out_h, out_w, groups, activation, out_channels_last, allow_tf32):
    acc = contract.accumulation_dtype(input.dtype)
    padded = _explicitly_padded(input.to(acc), weight, (stride_h, stride_w), (pad_h, pad_w),
                                (dilation_h, dilation_w), (out_h, out_w))
    z = F.conv2d(padded, weight.to(acc), None, (stride_h, stride_w), 0,
                 (dilation_h, dilation_w), groups)[:, :, :out_h, :out_w]
    if bias is not None:
        z = z + bias.to(acc)[:, None, None]
    if residual is not None:
        z = z + residual.to(acc)
    out = conv_contract.output_like(input, weight.shape[0], out_h, out_w, out_channels_last)
    out.copy_(activation_forward(z, activation))
    if linear_contract.saves_preactivation(activation):
        saved = torch.empty_like(out)
        saved.copy_(z)
        return out, saved
    return out, input.new_empty((0,))


def _conv2d_bwd(grad_out, input, weight, saved, stride_h, stride_w, pad_h, pad_w, dilation_h,
                dilation_w, out_h, out_w, groups, activation, allow_tf32, needs_input_grad,
                needs_weight_grad, needs_bias_grad, needs_preact_grad):
    acc = contract.accumulation_dtype(input.dtype)
    dz = grad_out.to(acc)
    if activation != "none":
        dz = dz * activation_derivative(saved.to(acc), activation)
    padded = _explicitly_padded(input.to(acc), weight, (stride_h, stride_w), (pad_h, pad_w),
                                (dilation_h, dilation_w), (out_h, out_w))
    full_h = (padded.shape[2] - dilation_h * (weight.shape[2] - 1) - 1) // stride_h + 1
    full_w = (padded.shape[3] - dilation_w * (weight.shape[3] - 1) - 1) // stride_w + 1
    dz_full = F.pad(dz, (0, full_w - out_w, 0, full_h - out_h))  # the cropped outputs: zero
    grad_padded, grad_weight, _ = torch.ops.aten.convolution_backward(
        dz_full, padded, weight.to(acc), None, (stride_h, stride_w), (0, 0),
        (dilation_h, dilation_w), False, (0, 0), groups,
        (needs_input_grad, needs_weight_grad, False))

    def empty():  # a fresh one each time: custom-op outputs may not alias each other
        return input.new_empty((0,))

    def like(source, template):
        result = torch.empty_like(template)
        result.copy_(source)
        return result

    height, width = input.shape[2], input.shape[3]
    grad_input = (like(grad_padded[:, :, pad_h:pad_h + height, pad_w:pad_w + width], input)
                  if needs_input_grad else empty())
    grad_weight = like(grad_weight, weight) if needs_weight_grad else empty()
    grad_bias = dz.sum(dim=(0, 2, 3)).to(weight.dtype) if needs_bias_grad else empty()
    grad_preact = like(dz, grad_out) if needs_preact_grad else empty()
    return grad_input, grad_weight, grad_bias, grad_preact


conv_ops = conv_contract.register_conv_ops(NAME, _conv2d_fwd, _conv2d_bwd)
conv2d_fwd, conv2d_bwd = conv_ops.fwd, conv_ops.bwd
