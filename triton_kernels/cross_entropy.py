"""Softmax-cross-entropy with class-index targets: one Triton program per row.

The math, per row (z = the logits, or softcap * tanh(logits / softcap); w = the class weights,
all ones without; t = the row's target; eps = label_smoothing; C = the number of classes)::

    lse  = log sum_c exp(z_c)
    loss = w_t * ((1 - eps) * (lse - z_t) + z_loss * lse**2) + eps / C * sum_c w_c * (lse - z_c)

    p_c  = exp(z_c - lse)
    dloss/dz_c      = w_t * ((1 - eps) * (p_c - [c == t]) + 2 * z_loss * lse * p_c)
                      + eps / C * (sum(w) * p_c - w_c)
    dloss/dlogits_c = dloss/dz_c * (1 - tanh(logits_c / softcap)**2)       (with softcap)

and times grad_loss[row] in backward. A row whose target is ignore_index has loss 0 and
gradient 0; a target outside [0, C) that is not ignore_index gives a NaN loss and a NaN
gradient row, and is clamped to class 0 before any load, so it never reads out of bounds.

Forward: one pass over the row in BLOCK_C chunks, an online softmax (Milakov & Gimelshein
2018): a running max m and a running sum s = sum exp(z - m), rescaled by exp(m_old - m_new)
when the max grows, so the logits are read once. The label-smoothing sum is carried the same
way, as A = sum_c w_c * (m - z_c) >= 0 rebased by (m_new - m_old) * sum(w seen), so it is a sum
of non-negative terms that never cancels, even at |z| ~ 1e4. z_t is one scalar load.
It writes the loss and lse; lse is all backward needs to turn each logit into p with one exp.
Backward reads the row once and writes the gradient once (over the logits for the in-place
variant: each chunk is read before it is written, and no chunk is read twice).

Saving only a float32 lse has a price no kernel can avoid: lse holds ~|lse| * 6e-8 absolute,
which p = exp(z - lse) carries as relative error (~1e-3 at |z| ~ 1e4), and which a confident
row's small 1 - p_t carries relative to itself (torch's own float32 path does the same).

Bytes moved, N rows, C classes, b bytes per logit (2 for fp16/bf16, 4 for fp32), targets of
4 or 8 bytes:
    forward   N*C*b read + 4-8N (target) + 8N written (loss, lse)                ~ N*C*b
    backward  N*C*b read + N*C*b written + 12-16N (target, lse, grad_loss)      ~ 2*N*C*b
plus 4C of class weights per row, which stay in L2. Ignored rows (padding) read no logits in
backward (their loads are masked off): they cost only the write of their zeros.

Every output element is written by a kernel; the launchers fill nothing. All row offsets are
64-bit, so N*C > 2**31 is fine. Everything accumulates in float32 from the loaded dtype; no
float32 copy of the logits is ever made.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

# --- configuration -------------------------------------------------------------------------
# NOT yet measured on a GPU: starting points from the fused-softmax tutorial and Liger-Kernel
# (memory-bound, one program per row, ~16 elements per thread per chunk). To be replaced by
# the numbers benchmarks/ measures, with the result file cited here.
GPU_MAX_BLOCK_C = 4096
# The interpreter pays per op, not per element, so fewer, larger chunks are faster there
# (C = 4099: 87 ms fwd+bwd at 4096, 114 ms at 1024, 219 ms at 512 on 2 rows); 1024 still
# makes the test sizes C = 1037, 1100 and 4099 cross chunk boundaries, the loop to test.
INTERPRETER_MAX_BLOCK_C = 1024
MAX_NUM_WARPS = 16
ELEMENTS_PER_WARP = 512  # 16 per thread


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch_config(num_classes: int) -> tuple[int, int]:
    """(BLOCK_C, num_warps) for rows of ``num_classes``; one fixed config, no autotuning."""
    max_block = INTERPRETER_MAX_BLOCK_C if _interpreting() else GPU_MAX_BLOCK_C
    block_c = min(triton.next_power_of_2(num_classes), max_block)
    num_warps = min(MAX_NUM_WARPS, max(1, block_c // ELEMENTS_PER_WARP))
    return block_c, num_warps


# --- kernels -------------------------------------------------------------------------------


@triton.jit
def softcap_and_slope(x, softcap):
    """z = softcap * tanh(x / softcap) and dz/dx = 1 - tanh(x / softcap)**2, in float32.

    tanh from one exp, as Triton has no portable tanh (libdevice's fails in the interpreter):
    with e = exp(-2|y|) in [0, 1], |tanh y| = (1 - e) / (1 + e) and 1 - tanh**2 = 4e / (1 + e)**2,
    neither of which can overflow (x = +-inf gives z = +-softcap, slope 0). Below |y| = 1/4 the
    first form loses digits to cancellation, so tanh's Taylor series (to y**9, relative error
    < 1e-8 there) takes over.
    """
    y = x / softcap
    e = tl.exp(-2.0 * tl.abs(y))
    tanh_abs = (1.0 - e) / (1.0 + e)
    y2 = y * y
    series = y * (1.0 + y2 * (-0.3333333333333333 + y2 * (0.13333333333333333 + y2 * (
        -0.05396825396825397 + y2 * 0.021869488536155203))))
    tanh = tl.where(tl.abs(y) < 0.25, series, tl.where(y < 0.0, -tanh_abs, tanh_abs))
    slope = 4.0 * e / ((1.0 + e) * (1.0 + e))
    return softcap * tanh, slope


@triton.jit
def row_target(target_ptr, row, C, ignore_index):
    """The row's class, whether it counts (not ignore_index), whether it lies outside [0, C),
    and a class that is safe to load at (0 for ignored and out-of-range rows)."""
    target = tl.load(target_ptr + row).to(tl.int64)
    counted = target != ignore_index
    out_of_range = counted & ((target < 0) | (target >= C))
    safe_target = tl.where(counted & ~out_of_range, target, 0)
    return counted, out_of_range, safe_target


@triton.jit
def ce_fwd_kernel(logits_ptr, target_ptr, weight_ptr, loss_ptr, lse_ptr,
                  C, stride_row, ignore_index, label_smoothing, z_loss, softcap,
                  HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row

    counted, out_of_range, safe_target = row_target(target_ptr, row, C, ignore_index)
    z_target = tl.load(row_ptr + safe_target).to(tl.float32)
    if HAS_SOFTCAP:
        z_target, _target_slope = softcap_and_slope(z_target, softcap)
    if HAS_WEIGHT:
        w_target = tl.load(weight_ptr + safe_target).to(tl.float32)
    else:
        w_target = 1.0

    # Online softmax. `shift` is m where m is finite and 0 while every z seen is -inf, so no
    # exp ever sees (-inf) - (-inf): s = sum exp(z - shift), smooth = sum w * (shift - z).
    m = float("-inf")
    shift = 0.0
    s = 0.0
    smooth = 0.0
    weight_seen = 0.0
    offsets = tl.arange(0, BLOCK_C)
    for start in range(0, C, BLOCK_C):
        cols = start + offsets
        mask = cols < C
        z = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:
            # Not `_`, which the scalar unpacking above binds: the compiler would take it for
            # a loop-carried variable changing type (the interpreter would not notice).
            z, _slope = softcap_and_slope(z, softcap)
            z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        shift_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        # exp(m - shift_new) is 0 while m is -inf (s is 0 then anyway), else exp(m - m_new).
        s = s * tl.exp(m - shift_new) + tl.sum(tl.exp(z - shift_new), axis=0)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                w = mask.to(tl.float32)
            gap = tl.where(mask, shift_new - z, 0.0)  # >= 0; 0 (not inf) past the row's end
            smooth = smooth + (shift_new - shift) * weight_seen + tl.sum(w * gap, axis=0)
            weight_seen = weight_seen + tl.sum(w, axis=0)
        m = m_new
        shift = shift_new

    log_s = tl.log(s)
    lse = shift + log_s
    # lse - z_t as (shift - z_t) + log s: at |z| ~ 1e4, lse rounded to float32 alone would
    # lose the loss's last three digits.
    nll = (shift - z_target) + log_s
    loss = w_target * ((1.0 - label_smoothing) * nll + z_loss * lse * lse)
    if HAS_SMOOTHING:
        # sum_c w_c (lse - z_c) = (lse - shift) * sum(w) + sum_c w_c (shift - z_c)
        loss = loss + label_smoothing / C * (log_s * weight_seen + smooth)
    loss = tl.where(counted, loss, 0.0)
    loss = tl.where(out_of_range, float("nan"), loss)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)


@triton.jit
def ce_bwd_kernel(logits_ptr, target_ptr, weight_ptr, weight_sum_ptr, lse_ptr, grad_loss_ptr,
                  out_ptr, C, stride_row, stride_out_row, ignore_index, label_smoothing, z_loss,
                  softcap, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    out_row_ptr = out_ptr + row.to(tl.int64) * stride_out_row

    counted, out_of_range, safe_target = row_target(target_ptr, row, C, ignore_index)
    if HAS_WEIGHT:
        w_target = tl.load(weight_ptr + safe_target).to(tl.float32)
    else:
        w_target = 1.0
    lse = tl.load(lse_ptr + row)
    grad_loss = tl.load(grad_loss_ptr + row)

    z_loss_scale = 2.0 * z_loss * lse
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            weight_sum = tl.load(weight_sum_ptr).to(tl.float32)
        else:
            weight_sum = C * 1.0

    offsets = tl.arange(0, BLOCK_C)
    for start in range(0, C, BLOCK_C):
        cols = start + offsets
        mask = cols < C
        # An ignored row's gradient is 0 whatever its logits: it reads nothing. (-inf, not 0,
        # past the row's end, so p is 0 there rather than an overflowing exp(-lse).)
        x = tl.load(row_ptr + cols, mask=mask & counted, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:
            z, slope = softcap_and_slope(x, softcap)
        else:
            z = x
        p = tl.exp(z - lse)
        # Term by term as in the math: p - [c == t] and sum(w) * p - w_c are formed before
        # anything scales them, so a confident row (p_t ~ 1) keeps its small gradient's digits.
        is_target = tl.where(cols == safe_target, 1.0, 0.0)
        grad = w_target * ((1.0 - label_smoothing) * (p - is_target) + z_loss_scale * p)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=mask & counted, other=0.0).to(tl.float32)
            else:
                w = 1.0
            grad = grad + label_smoothing / C * (weight_sum * p - w)
        grad = grad * grad_loss
        if HAS_SOFTCAP:
            grad = grad * slope
        grad = tl.where(counted, grad, 0.0)
        grad = tl.where(out_of_range, float("nan"), grad)
        tl.store(out_row_ptr + cols, grad.to(out_ptr.dtype.element_ty), mask=mask)


# --- launchers -----------------------------------------------------------------------------
# They take contiguous 1-D target (int32/int64), weight (float32), lse and grad_loss
# (float32), and (N, C) logits with stride(1) == 1; they allocate nothing but weight.sum().


def _on_device(tensor: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device), on its stream."""
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def ce_fwd_launch(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                  loss, lse):
    """Per-row loss and lse of ``logits`` (N, C) into ``loss`` and ``lse`` (N,) float32."""
    rows, classes = logits.shape
    if rows == 0:
        return
    block_c, num_warps = launch_config(classes)
    with _on_device(logits):
        ce_fwd_kernel[(rows,)](
            logits, target,
            weight if weight is not None else loss,  # never read without HAS_WEIGHT
            loss, lse, classes, logits.stride(0), ignore_index, float(label_smoothing),
            float(z_loss), float(softcap) if softcap else 1.0,
            HAS_WEIGHT=weight is not None, HAS_SMOOTHING=bool(label_smoothing),
            HAS_SOFTCAP=bool(softcap), BLOCK_C=block_c, num_warps=num_warps)


def ce_bwd_launch(logits, target, weight, lse, grad_loss, ignore_index, label_smoothing, z_loss,
                  softcap, out):
    """d(sum_i grad_loss[i] * loss[i]) / d logits into ``out`` (may be ``logits`` itself)."""
    rows, classes = logits.shape
    if rows == 0:
        return
    block_c, num_warps = launch_config(classes)
    with _on_device(logits):
        # sum(w) as a device scalar: no host sync.
        weight_sum = weight.sum() if weight is not None and label_smoothing else lse
        ce_bwd_kernel[(rows,)](
            logits, target,
            weight if weight is not None else lse,  # never read without HAS_WEIGHT
            weight_sum, lse, grad_loss, out, classes, logits.stride(0), out.stride(0),
            ignore_index, float(label_smoothing), float(z_loss),
            float(softcap) if softcap else 1.0,
            HAS_WEIGHT=weight is not None, HAS_SMOOTHING=bool(label_smoothing),
            HAS_SOFTCAP=bool(softcap), BLOCK_C=block_c, num_warps=num_warps)
