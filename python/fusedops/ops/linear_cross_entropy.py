"""fusedops.linear_cross_entropy: cross-entropy of ``F.linear(input, weight, bias)`` in chunks.

``linear_cross_entropy(x, W, target, b, ...)`` equals
``cross_entropy(F.linear(x, W, b), target, class_weight, ...)`` but never holds the whole
``(tokens, vocab)`` logits: with a 128k vocabulary those are 0.5 MB per token in float32,
more than the rest of a language model's activations.

Algorithm
---------
Flatten ``input`` to ``(M, H)`` tokens and ``target`` to ``(M,)``. For "mean" compute the
denominator first, on the device (the sum of the class weights of counted rows, or their
count), so every chunk can fold ``1 / denominator`` into its gradient. Then for each chunk of
``R`` token rows::

    logits = tier.linear_fwd(x[rows], W, b)                   (R, V), input's dtype
    loss[rows], lse[rows] = tier.ce_fwd(logits, target[rows])
    # with gradients, right away, because the logits die with the chunk:
    dlogits = tier.ce_bwd(logits, ..., grad_loss = 1/denominator ("mean") or 1 ("sum"),
                          inplace=True)                       overwrites the logits
    grad_x[rows] = tier.linear_bwd(dlogits, x[rows], W)       input gradient only
    tier.linear_weight_grad_accumulate(dlogits, x[rows], grad_W, grad_b)
                                                  grad_W += dlogits^T x, in place, float32

The autograd backward then only multiplies the stored gradients by the scalar upstream
gradient and casts ``grad_W`` / ``grad_b`` to the weight's dtype (no host sync anywhere).

``reduction="none"`` cannot do this: each row's upstream gradient is known only in backward,
and ``grad_W = sum_i g_i * dlogits_i^T x_i`` cannot be rescaled per row after the sum. So for
"none" the forward keeps only the per-row ``lse`` and the backward recomputes each chunk's
logits (one more ``(M, H) x (H, V)`` GEMM than "mean"/"sum") and runs ``ce_bwd`` with the
true ``g_i``.

Under ``torch.no_grad()``, or when none of input, weight and bias requires grad, the chunks
stop after ``ce_fwd``.

Chunk size and memory
---------------------
``R = min(M, max(1, CHUNK_BYTES // (V * element_size)))`` rows, rounded down to a multiple of
128 when it is at least 128 (whole GEMM tiles), so one chunk's logits take at most
``CHUNK_BYTES`` (default 256 MiB, or ``$FUSEDOPS_LCE_CHUNK_BYTES`` read at import; tests
override the module constant). Peak extra memory with gradients, beyond the inputs:
one chunk's logits (``<= CHUNK_BYTES``, reused in place for their gradient), the tier's own
working memory for that chunk, ``grad_x`` ``(M, H)`` in the input's dtype, ``grad_W`` and
``grad_b`` in float32 (added into in place: no per-chunk weight-sized temporary), and ``(M,)`` loss
and lse vectors: ``O(CHUNK_BYTES + M*H + V*H)``, never ``O(M*V)``.

Autocast: F.linear runs in the autocast dtype and cross-entropy in float32, so under autocast
input, weight and bias are cast as autocast casts F.linear's arguments (floating, not float64)
and the loss comes back in float32. Custom ops are not autocast by torch: autocast is switched
off around the chunk loops.
"""

from __future__ import annotations

import math
import os

import torch

from fusedops import dispatch
from fusedops._autograd import once_differentiable_op
from fusedops.dispatch import contract
from fusedops.ops.cross_entropy import mean_denominator
from fusedops.ops.linear import allow_tf32 as linear_allow_tf32

OP_NAME = "linear_cross_entropy"
# The most bytes one chunk's logits may take (see the module docstring).
CHUNK_BYTES = int(os.environ.get("FUSEDOPS_LCE_CHUNK_BYTES", 256 * 1024 * 1024))
# A chunk of at least this many rows is rounded down to a multiple of it.
CHUNK_ROW_MULTIPLE = 128

_REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int64, torch.int32, torch.uint8)


def _fail(exc_type, message):
    raise exc_type(f"fusedops.linear_cross_entropy: {message}")


def chunk_rows(rows: int, vocab: int, element_size: int, budget: int | None = None) -> int:
    """Token rows per chunk so that one chunk's ``(rows, vocab)`` logits fit ``budget`` bytes."""
    budget = CHUNK_BYTES if budget is None else budget
    per_chunk = max(1, budget // max(1, vocab * element_size))
    if per_chunk >= CHUNK_ROW_MULTIPLE:
        per_chunk -= per_chunk % CHUNK_ROW_MULTIPLE
    return max(1, min(rows, per_chunk))


def _check_tensor(name, value, optional=False):
    if optional and value is None:
        return
    if not isinstance(value, torch.Tensor):
        kind = "a Tensor or None" if optional else "a Tensor"
        _fail(TypeError, f"{name} must be {kind}, got {type(value).__name__}")


def _check_arguments(input, weight, target, bias, class_weight, ignore_index, reduction,
                     label_smoothing, z_loss, softcap):
    _check_tensor("input", input)
    _check_tensor("weight", weight)
    _check_tensor("target", target)
    _check_tensor("bias", bias, optional=True)
    _check_tensor("class_weight", class_weight, optional=True)
    for name, tensor in (("input", input), ("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.dtype not in _FLOAT_DTYPES:
            _fail(TypeError, f"{name} must be float16, bfloat16, float32 or float64, "
                             f"got {tensor.dtype}")
    if input.dim() == 0:
        _fail(ValueError, "input must have at least 1 dimension (..., H), got a 0-d tensor")
    if weight.dim() != 2:
        _fail(ValueError, f"weight must be 2-D (V, H), got shape {tuple(weight.shape)}")
    vocab, hidden = weight.shape
    if input.shape[-1] != hidden:
        _fail(ValueError, f"input's last dimension ({input.shape[-1]}) must equal weight's "
                          f"hidden size H = weight.shape[1] ({hidden})")
    if vocab == 0:
        _fail(ValueError, f"weight has 0 classes (shape {tuple(weight.shape)})")
    if bias is not None and bias.shape != (vocab,):
        _fail(ValueError, f"bias must have shape ({vocab},) (one per class), "
                          f"got {tuple(bias.shape)}")
    if target.is_floating_point() or target.dtype not in _INDEX_DTYPES:
        _fail(TypeError, f"target must hold class indices (int64, int32 or uint8), "
                         f"got {target.dtype}")
    if target.shape != input.shape[:-1]:
        _fail(ValueError, f"target must have shape {tuple(input.shape[:-1])} (input's leading "
                          f"dimensions), got {tuple(target.shape)}")
    if class_weight is not None:
        if not class_weight.is_floating_point():
            _fail(TypeError, f"class_weight must be floating point, got {class_weight.dtype}")
        if class_weight.shape != (vocab,):
            _fail(ValueError, f"class_weight must have shape ({vocab},) (one per class), "
                              f"got {tuple(class_weight.shape)}")
    for name, tensor in (("weight", weight), ("target", target), ("bias", bias),
                         ("class_weight", class_weight)):
        if tensor is not None and tensor.device != input.device:
            _fail(ValueError, f"{name} is on {tensor.device} but input is on {input.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        _fail(TypeError, f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in _REDUCTIONS:
        _fail(ValueError, f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if (isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float))
            or not 0.0 <= label_smoothing <= 1.0):
        _fail(ValueError, f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if (isinstance(z_loss, bool) or not isinstance(z_loss, (int, float))
            or not math.isfinite(z_loss) or z_loss < 0):
        _fail(ValueError, f"z_loss must be a finite float >= 0, got {z_loss!r}")
    if softcap is not None and (isinstance(softcap, bool)
                                or not isinstance(softcap, (int, float))
                                or not math.isfinite(softcap) or softcap <= 0):
        _fail(ValueError, f"softcap must be None or a finite float > 0, got {softcap!r}")


def _check_matching_dtypes(input, weight, bias):
    """After autocast's casts: F.linear needs one dtype for input, weight and bias."""
    if weight.dtype != input.dtype:
        _fail(TypeError, f"weight's dtype {weight.dtype} must match input's {input.dtype}")
    if bias is not None and bias.dtype != input.dtype:
        _fail(TypeError, f"bias's dtype {bias.dtype} must match input's {input.dtype}")


def tier_unsupported(tier, input, weight, bias, target) -> str | None:
    """None when ``tier`` runs both halves of this call, else why not (no host sync).

    ``input`` ``(M, H)`` and ``target`` ``(M,)`` as the chunks will pass them; the logits
    ``ce_fwd`` sees are ``(rows, V)``, contiguous, in the input's dtype.
    """
    needed = ("linear_fwd", "linear_bwd", "linear_weight_grad_accumulate")
    if not all(hasattr(tier, name) for name in needed):
        return (f"the {tier.NAME} tier has no fused linear ({' / '.join(needed)}), which "
                f"linear_cross_entropy needs")
    linear_unsupported = getattr(tier, "linear_unsupported", None)
    if linear_unsupported is not None:
        reason = linear_unsupported(input, weight, bias, None, "none")
        if reason is not None:
            return reason
    logits_like = input.new_empty((1, weight.shape[0]))  # what a chunk's logits look like
    return tier.ce_unsupported(logits_like, target, probability_target=False)


def _no_autocast(device_type):
    return torch.autocast(device_type, enabled=False)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Reduced (or per-row) loss of ``cross_entropy(x @ W.T + b)``, chunk by chunk.

    Returns the loss in the accumulation dtype: a scalar for "mean"/"sum", ``(M,)`` for
    "none". ``needs`` says which of input, weight and bias get a gradient (all False under
    no_grad, decided by the caller because grad mode is off inside ``forward``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, target, class_weight, denominator, tier_name, options,
                needs, rows_per_chunk):
        ignore_index, label_smoothing, z_loss, softcap, reduction, allow_tf32 = options
        needs_input_grad, needs_weight_grad, needs_bias_grad = needs
        tier = dispatch.TIERS[tier_name]
        rows, hidden = x.shape
        vocab = weight.shape[0]
        acc = contract.accumulation_dtype(x.dtype)
        eager_grads = any(needs) and reduction != "none"
        keep_lse = any(needs) and reduction == "none"

        row_loss = contract.new_output((rows,), dtype=acc, device=x.device)
        lse = contract.new_output((rows,) if keep_lse else (0,), dtype=acc, device=x.device)
        # float64 gradients stay float64; everything else accumulates in float32.
        grad_input = grad_weight = grad_bias = None
        if eager_grads:
            if needs_input_grad:
                grad_input = contract.new_output((rows, hidden), dtype=x.dtype,
                                                 device=x.device)
            if needs_weight_grad:
                grad_weight = torch.zeros((vocab, hidden), dtype=acc, device=x.device)
            if needs_bias_grad:
                grad_bias = torch.zeros((vocab,), dtype=acc, device=x.device)
            row_grad = (denominator.reciprocal() if reduction == "mean"
                        else torch.ones((), dtype=acc, device=x.device))

        with _no_autocast(x.device.type):
            for start in range(0, rows, rows_per_chunk):
                end = min(start + rows_per_chunk, rows)
                x_chunk, target_chunk = x[start:end], target[start:end]
                logits, _ = tier.linear_fwd(x_chunk, weight, bias, None, "none", allow_tf32)
                loss_chunk, lse_chunk = tier.ce_fwd(logits, target_chunk, class_weight,
                                                    ignore_index, label_smoothing, z_loss,
                                                    softcap)
                row_loss[start:end].copy_(loss_chunk)
                if keep_lse:
                    lse[start:end].copy_(lse_chunk)
                if not eager_grads:
                    continue
                grad_loss = row_grad.expand(end - start).contiguous()
                _backpropagate_chunk(tier, logits, x_chunk, weight, target_chunk, class_weight,
                                     lse_chunk, grad_loss, options,
                                     grad_input[start:end] if needs_input_grad else None,
                                     grad_weight, grad_bias)

        if reduction == "none":
            result = row_loss
        else:
            result = row_loss.sum()
            if reduction == "mean":
                result = result / denominator

        ctx.tier_name, ctx.options, ctx.needs = tier_name, options, needs
        ctx.rows_per_chunk = rows_per_chunk
        ctx.weight_dtype = weight.dtype
        if eager_grads:
            ctx.save_for_backward(grad_input, grad_weight, grad_bias)
        elif keep_lse:
            ctx.save_for_backward(x, weight, bias, target, class_weight, lse)
        return result

    @staticmethod
    @once_differentiable_op("linear_cross_entropy")
    def backward(ctx, grad_result):
        needs_input_grad, needs_weight_grad, needs_bias_grad = ctx.needs
        reduction = ctx.options[4]
        if reduction == "none":
            grads = _recompute_backward(ctx, grad_result)
        else:
            grad_input, grad_weight, grad_bias = ctx.saved_tensors
            scale = grad_result.to(torch.float64 if ctx.weight_dtype == torch.float64
                                   else torch.float32)
            grads = (grad_input * scale.to(grad_input.dtype) if needs_input_grad else None,
                     (grad_weight * scale).to(ctx.weight_dtype) if needs_weight_grad else None,
                     (grad_bias * scale).to(ctx.weight_dtype) if needs_bias_grad else None)
        return (*grads, None, None, None, None, None, None, None)


def _backpropagate_chunk(tier, logits, x_chunk, weight, target_chunk, class_weight, lse_chunk,
                         grad_loss, options, grad_input_rows, grad_weight, grad_bias):
    """One chunk's gradients: ce_bwd over its logits (in place), then ``grad_input_rows``
    (written), ``grad_weight`` and ``grad_bias`` (float32 accumulators, added into)."""
    ignore_index, label_smoothing, z_loss, softcap, _, allow_tf32 = options
    dlogits = tier.ce_bwd(logits, target_chunk, class_weight, lse_chunk, grad_loss,
                          ignore_index, label_smoothing, z_loss, softcap, True)
    if grad_input_rows is not None:
        grad_x, _, _, _ = tier.linear_bwd(dlogits, x_chunk, weight, x_chunk.new_empty((0,)),
                                          "none", allow_tf32, True, False, False, False)
        grad_input_rows.copy_(grad_x)
    if grad_weight is not None:
        tier.linear_weight_grad_accumulate(dlogits, x_chunk, grad_weight, grad_bias, allow_tf32)
    elif grad_bias is not None:  # a trainable bias on a frozen weight: rare, plain torch
        grad_bias += dlogits.to(grad_bias.dtype).sum(dim=0)


def _recompute_backward(ctx, grad_rows):
    """reduction="none": redo each chunk's logits and push the per-row ``grad_rows`` through."""
    x, weight, bias, target, class_weight, lse = ctx.saved_tensors
    allow_tf32 = ctx.options[-1]
    needs_input_grad, needs_weight_grad, needs_bias_grad = ctx.needs
    tier = dispatch.TIERS[ctx.tier_name]
    rows, hidden = x.shape
    vocab = weight.shape[0]
    acc = contract.accumulation_dtype(x.dtype)
    grad_rows = grad_rows.to(acc).contiguous()
    grad_input = (contract.new_output((rows, hidden), dtype=x.dtype, device=x.device)
                  if needs_input_grad else None)
    grad_weight = (torch.zeros((vocab, hidden), dtype=acc, device=x.device)
                   if needs_weight_grad else None)
    grad_bias = torch.zeros((vocab,), dtype=acc, device=x.device) if needs_bias_grad else None
    step = ctx.rows_per_chunk
    with _no_autocast(x.device.type):
        for start in range(0, rows, step):
            end = min(start + step, rows)
            x_chunk, target_chunk = x[start:end], target[start:end]
            logits, _ = tier.linear_fwd(x_chunk, weight, bias, None, "none", allow_tf32)
            _backpropagate_chunk(tier, logits, x_chunk, weight, target_chunk, class_weight,
                                 lse[start:end], grad_rows[start:end], ctx.options,
                                 grad_input[start:end] if needs_input_grad else None,
                                 grad_weight, grad_bias)
    return (grad_input,
            grad_weight.to(weight.dtype) if needs_weight_grad else None,
            grad_bias.to(weight.dtype) if needs_bias_grad else None)


def _autocast_linear_dtype(device_type: str) -> torch.dtype:
    get = getattr(torch, "get_autocast_dtype", None)
    if get is not None:
        return get(device_type)
    return (torch.get_autocast_gpu_dtype() if device_type == "cuda"  # pragma: no cover
            else torch.get_autocast_cpu_dtype())


def linear_cross_entropy(input, weight, target, bias=None, *, class_weight=None,
                         ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                         softcap=None):
    """``cross_entropy(F.linear(input, weight, bias), target, class_weight, ...)``, chunked.

    ``input`` ``(..., H)``; ``weight`` ``(V, H)``; ``bias`` ``(V,)`` or None; ``target`` of
    ``input``'s leading shape, int64 / int32 (or uint8) class indices; ``class_weight``
    ``(V,)`` or None. The options are ``fusedops.cross_entropy``'s: ``z_loss`` adds
    ``z_loss * lse**2`` to each non-ignored row's loss before its class weight multiplies it,
    ``softcap`` replaces logits by ``softcap * tanh(logits / softcap)``. The result has the
    dtype cross_entropy would give (the input's; float32 under autocast); "none" gives
    ``input``'s leading shape. The ``(tokens, V)`` logits are never materialised: they are
    formed and consumed ``CHUNK_BYTES`` at a time (see the module docstring).
    """
    _check_arguments(input, weight, target, bias, class_weight, ignore_index, reduction,
                     label_smoothing, z_loss, softcap)
    label_smoothing, z_loss = float(label_smoothing), float(z_loss)
    softcap = float(softcap) if softcap is not None else 0.0
    device_type = input.device.type
    autocasting = torch.is_autocast_enabled(device_type)
    if autocasting:  # autocast casts F.linear's floating arguments, float64 excepted
        low = _autocast_linear_dtype(device_type)

        def cast(t):
            return t.to(low) if t is not None and t.dtype != torch.float64 else t

        input, weight, bias = cast(input), cast(weight), cast(bias)
    _check_matching_dtypes(input, weight, bias)
    out_dtype = torch.float32 if autocasting and input.dtype != torch.float64 else input.dtype

    vocab, hidden = weight.shape
    batch_shape = input.shape[:-1]
    x = input.reshape(-1, hidden)
    target = target.reshape(-1)
    if target.dtype == torch.uint8:
        target = target.to(torch.int32)
    acc = contract.accumulation_dtype(x.dtype)
    if class_weight is not None:
        class_weight = class_weight.to(acc).contiguous()

    if device_type == "cuda" and os.environ.get("FUSEDOPS_DEBUG") == "1":
        contract.check_targets_in_range(target, vocab, ignore_index)  # host sync
    tier = dispatch.select(OP_NAME, x.device,
                           lambda t: tier_unsupported(t, x, weight, bias, target))

    denominator = None
    if reduction == "mean":  # on the device, before the first chunk needs it
        denominator = mean_denominator(target, class_weight, ignore_index, vocab, acc)

    grad_enabled = torch.is_grad_enabled()
    needs = (grad_enabled and input.requires_grad,
             grad_enabled and weight.requires_grad,
             grad_enabled and bias is not None and bias.requires_grad)
    allow_tf32 = x.dtype == torch.float32 and linear_allow_tf32()
    rows_per_chunk = chunk_rows(x.shape[0], vocab, x.element_size())
    options = (ignore_index, label_smoothing, z_loss, softcap, reduction, allow_tf32)
    result = LinearCrossEntropyFunction.apply(x, weight, bias, target, class_weight,
                                              denominator, tier.NAME, options, needs,
                                              rows_per_chunk)
    if reduction == "none":
        result = result.reshape(batch_shape)
    return result.to(out_dtype)
