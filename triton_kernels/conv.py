"""Fused conv2d in Triton: implicit GEMM in NHWC, forward and backward, epilogue fused.

The math. With output pixel ``p = (n, oh, ow)`` and tap ``(r, s)``, the input pixel it reads
is ``(n, oh·stride_h − pad_h + r·dil_h, ow·stride_w − pad_w + s·dil_w)`` (zero outside the
image). A convolution is then three GEMMs that are never materialised (no im2col buffer):

* forward ``z[p, k] = Σ_{r, s, c} x[pixel(p, r, s), c] · w[k, c, r, s]``: M = N·OH·OW rows,
  N = K output channels, a reduction over R·S·C; bias, residual and the activation applied
  to the float32 accumulator before the one store (``conv2d_fwd_kernel``).
* input gradient ``dx[q, c] = Σ_{r, s, k} dz[p(q, r, s), k] · w[k, c, r, s]`` where input
  pixel ``q`` is reached from output pixel ``p`` by tap (r, s) when
  ``ih + pad_h − r·dil_h`` is a non-negative multiple of ``stride_h`` (likewise w):
  M = N·H·W, N = C, a reduction over R·S·K (``conv2d_bwd_input_kernel``). With stride > 1
  most taps miss and are masked: work the CUDA tier should skip, and this tier does not.
* weight gradient ``dw[k, c, r, s] = Σ_p dz[p, k] · x[pixel(p, r, s), c]``: one K×C GEMM
  per tap with a reduction over all N·OH·OW output pixels — long, so it is split across
  programs (``SPLIT``) into float32 partial sums that are added in a fixed order afterwards
  (bitwise reproducible). The programs of tap 0 and the first channel block also produce
  ``dz`` itself (the residual's gradient) and its column sums (the bias gradient).

``dz = grad_out · act'(z)`` is formed as grad_out tiles are loaded (the forward saved ``z``
for gelu, gelu_tanh and silu, ``out`` for relu), never in a separate pass.

Offsets: a pixel's offset (image, row, column) is 64-bit; a channel's (``c · stride_c``)
stays 32-bit — one image's channels times its channel stride never reach 2**31 — because a
64-bit cast of the contiguous channel index hides its contiguity from Triton, and the loads
and stores then lose their vector width.

Layout: every tensor is addressed through its four strides, so any layout is correct; the
launchers convert the input and the weight to channels_last first (an NCHW input costs one
copy) so that the reduction dimension C is contiguous, the loads vectorise and the tiles go
to tensor cores (``tl.dot`` → ``mma.sync`` on sm_80, ``wgmma`` on sm_90). Offsets that can
pass 2**31 elements are formed in 64 bits.

Tile sizes: one fixed configuration under ``TRITON_INTERPRET=1``; on a GPU a short
autotuned list (unmeasured so far: the shapes the fused matmul starts from).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fusedops.triton_kernels.matmul import (
    ACTIVATION_CODES,
    _activation,
    _activation_derivative,
    _on_device,
    input_precision,
)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# (BLOCK_M, BLOCK_N, BLOCK_K) over (output pixels, output channels, reduction channels).
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4}
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8},
                  num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8},
                  num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8},
                  num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8},
                  num_stages=4, num_warps=4),
]
_TUNE_KEY = ["tune_m", "tune_n", "tune_k", "taps", "stride_key"]
# The weight gradient's reduction is split so that about this many programs run per SM.
_WEIGHT_GRAD_PROGRAMS_PER_SM = 4
_WEIGHT_GRAD_MIN_ROWS_PER_SPLIT = 1024
_INTERPRETER_SPLIT_ROWS = 64  # under the interpreter: small splits, so tests cross them


@triton.jit
def _grouped_tile(pid, rows, cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  GROUP_M: tl.constexpr):
    """Tile (pid_m, pid_n) of program pid, GROUP_M row tiles side by side for L2 reuse."""
    tiles_m = tl.cdiv(rows, BLOCK_M)
    tiles_n = tl.cdiv(cols, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _pixel(offs, height, width):
    """(image, row, column) of flat pixel indices over an (N, height, width) grid."""
    per_image = height * width
    image = offs // per_image
    rest = offs - image * per_image
    row = rest // width
    return image, row, rest - row * width


@triton.jit
def _offsets(image, row, col, stride_n, stride_h, stride_w):
    """64-bit element offsets of pixels (the channel offset is added by the caller)."""
    return (image.to(tl.int64) * stride_n + row.to(tl.int64) * stride_h
            + col.to(tl.int64) * stride_w)


@triton.jit
def conv2d_fwd_kernel(
        x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, z_ptr,
        C, H, W, K, OH, OW, R, S, M,
        stride_xn, stride_xc, stride_xh, stride_xw,
        stride_wk, stride_wc, stride_wr, stride_ws,
        stride_rn, stride_rk, stride_rh, stride_rw,
        stride_on, stride_ok, stride_oh, stride_ow,
        stride_zn, stride_zk, stride_zh, stride_zw,
        conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
        tune_m, tune_n, tune_k, taps, stride_key,
        HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
        STORE_Z: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One (BLOCK_M output pixels) x (BLOCK_N output channels) tile of act(conv + b + r)."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < K
    image, oh, ow = _pixel(offs_m, OH, OW)
    top = oh * conv_stride_h - pad_h
    left = ow * conv_stride_w - pad_w
    image_offset = image.to(tl.int64) * stride_xn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    channel_blocks = tl.cdiv(C, BLOCK_K)
    for step in range(0, R * S * channel_blocks):
        tap = step // channel_blocks
        c0 = (step - tap * channel_blocks) * BLOCK_K
        r = tap // S
        s = tap - r * S
        ih = top + r * dil_h
        iw = left + s * dil_w
        inside = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        offs_c = c0 + tl.arange(0, BLOCK_K)
        c_mask = offs_c < C
        a_ptrs = (x_ptr + (image_offset + ih.to(tl.int64) * stride_xh
                           + iw.to(tl.int64) * stride_xw)[:, None]
                  + offs_c[None, :] * stride_xc)
        a = tl.load(a_ptrs, mask=inside[:, None] & c_mask[None, :], other=0.0)
        b_ptrs = (w_ptr + offs_n[None, :] * stride_wk + offs_c[:, None] * stride_wc
                  + r * stride_wr + s * stride_ws)
        b = tl.load(b_ptrs, mask=c_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RESIDUAL:
        r_ptrs = (res_ptr + _offsets(image, oh, ow, stride_rn, stride_rh, stride_rw)[:, None]
                  + offs_n[None, :] * stride_rk)
        acc += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    if STORE_Z:
        z_ptrs = (z_ptr + _offsets(image, oh, ow, stride_zn, stride_zh, stride_zw)[:, None]
                  + offs_n[None, :] * stride_zk)
        tl.store(z_ptrs, acc.to(z_ptr.dtype.element_ty), mask=mask)
    out = _activation(acc, ACTIVATION)
    o_ptrs = (out_ptr + _offsets(image, oh, ow, stride_on, stride_oh, stride_ow)[:, None]
              + offs_n[None, :] * stride_ok)
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_dz(g_ptr, saved_ptr, pixel_offsets_g, pixel_offsets_s, offs_k, stride_gk, stride_sk,
             mask, ACTIVATION: tl.constexpr):
    """grad_out · act'(saved) for a tile of (pixels, output channels), in float32."""
    g = tl.load(g_ptr + pixel_offsets_g[:, None] + offs_k[None, :] * stride_gk,
                mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION != 0:
        saved = tl.load(saved_ptr + pixel_offsets_s[:, None]
                        + offs_k[None, :] * stride_sk, mask=mask, other=0.0)
        g = g * _activation_derivative(saved.to(tl.float32), ACTIVATION)
    return g


@triton.jit
def conv2d_bwd_input_kernel(
        g_ptr, saved_ptr, w_ptr, dx_ptr,
        C, H, W, K, OH, OW, R, S, M,
        stride_gn, stride_gk, stride_gh, stride_gw,
        stride_sn, stride_sk, stride_sh, stride_sw,
        stride_wk, stride_wc, stride_wr, stride_ws,
        stride_dn, stride_dc, stride_dh, stride_dw,
        conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
        tune_m, tune_n, tune_k, taps, stride_key,
        ACTIVATION: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One (BLOCK_M input pixels) x (BLOCK_N input channels) tile of the input gradient."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, C, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < C
    image, ih, iw = _pixel(offs_m, H, W)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    channel_blocks = tl.cdiv(K, BLOCK_K)
    for step in range(0, R * S * channel_blocks):
        tap = step // channel_blocks
        k0 = (step - tap * channel_blocks) * BLOCK_K
        r = tap // S
        s = tap - r * S
        oh_scaled = ih + pad_h - r * dil_h      # oh * stride_h when this tap reaches (ih, iw)
        ow_scaled = iw + pad_w - s * dil_w
        oh = oh_scaled // conv_stride_h
        ow = ow_scaled // conv_stride_w
        reached = (m_mask & (oh_scaled >= 0) & (ow_scaled >= 0)
                   & (oh * conv_stride_h == oh_scaled) & (ow * conv_stride_w == ow_scaled)
                   & (oh < OH) & (ow < OW))
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        mask = reached[:, None] & k_mask[None, :]
        dz = _load_dz(g_ptr, saved_ptr, _offsets(image, oh, ow, stride_gn, stride_gh, stride_gw),
                      _offsets(image, oh, ow, stride_sn, stride_sh, stride_sw), offs_k,
                      stride_gk, stride_sk, mask, ACTIVATION)
        b_ptrs = (w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wc
                  + r * stride_wr + s * stride_ws)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(dz.to(b.dtype), b, acc, input_precision=INPUT_PRECISION)

    d_ptrs = (dx_ptr + _offsets(image, ih, iw, stride_dn, stride_dh, stride_dw)[:, None]
              + offs_n[None, :] * stride_dc)
    tl.store(d_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def conv2d_bwd_weight_kernel(
        g_ptr, saved_ptr, x_ptr, dw_partial_ptr, db_partial_ptr, dz_ptr,
        C, H, W, K, OH, OW, R, S, M, rows_per_split,
        stride_gn, stride_gk, stride_gh, stride_gw,
        stride_sn, stride_sk, stride_sh, stride_sw,
        stride_xn, stride_xc, stride_xh, stride_xw,
        stride_zn, stride_zk, stride_zh, stride_zw,
        conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
        tune_m, tune_n, tune_k, taps, stride_key,
        ACTIVATION: tl.constexpr, COMPUTE_WEIGHT: tl.constexpr, STORE_BIAS: tl.constexpr,
        STORE_DZ: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Grid (K x C tiles, taps, splits): one split's partial sum of one tap's weight tile.

    ``dw_partial`` is float32 ``(SPLIT, K, R, S, C)`` and ``db_partial`` ``(SPLIT, K)``: the
    launcher adds the splits in order. Here BLOCK_M tiles output channels, BLOCK_N input
    channels, BLOCK_K output pixels (the reduction).
    """
    pid_m, pid_n = _grouped_tile(tl.program_id(0), K, C, BLOCK_M, BLOCK_N, GROUP_M)
    tap = tl.program_id(1)
    split = tl.program_id(2)
    r = tap // S
    s = tap - r * S
    offs_k = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)     # output channels
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)     # input channels
    k_mask = offs_k < K
    c_mask = offs_c < C
    # The programs of tap 0 and the first channel block see every dz element exactly once.
    owns_dz = (tap == 0) & (pid_n == 0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)
    for p0 in range(row_start, row_end, BLOCK_K):
        offs_p = p0 + tl.arange(0, BLOCK_K)
        p_mask = offs_p < row_end
        image, oh, ow = _pixel(offs_p, OH, OW)
        mask = p_mask[:, None] & k_mask[None, :]
        dz = _load_dz(g_ptr, saved_ptr, _offsets(image, oh, ow, stride_gn, stride_gh, stride_gw),
                      _offsets(image, oh, ow, stride_sn, stride_sh, stride_sw), offs_k,
                      stride_gk, stride_sk, mask, ACTIVATION)          # (BLOCK_K, BLOCK_M)
        if STORE_DZ:
            if owns_dz:
                z_ptrs = (dz_ptr + _offsets(image, oh, ow, stride_zn, stride_zh,
                                            stride_zw)[:, None]
                          + offs_k[None, :] * stride_zk)
                tl.store(z_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if STORE_BIAS:
            bias_acc += tl.sum(dz, 0)
        if COMPUTE_WEIGHT:
            ih = oh * conv_stride_h - pad_h + r * dil_h
            iw = ow * conv_stride_w - pad_w + s * dil_w
            inside = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_ptrs = (x_ptr + _offsets(image, ih, iw, stride_xn, stride_xh, stride_xw)[:, None]
                      + offs_c[None, :] * stride_xc)
            x = tl.load(x_ptrs, mask=inside[:, None] & c_mask[None, :], other=0.0)
            acc = tl.dot(tl.trans(dz.to(x.dtype)), x, acc, input_precision=INPUT_PRECISION)

    if COMPUTE_WEIGHT:
        # (SPLIT, K, R, S, C) float32, contiguous
        taps_total = R * S
        partial = (dw_partial_ptr + split.to(tl.int64) * K * taps_total * C
                   + (offs_k[:, None].to(tl.int64) * taps_total + tap) * C + offs_c[None, :])
        tl.store(partial, acc, mask=k_mask[:, None] & c_mask[None, :])
    if STORE_BIAS:
        if owns_dz:
            tl.store(db_partial_ptr + split.to(tl.int64) * K + offs_k, bias_acc, mask=k_mask)


# --- launchers --------------------------------------------------------------------------


def _strides(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def _bucket(size: int) -> int:
    return triton.next_power_of_2(max(size, 1))


def _autotuned(kernel, reset=None):
    return triton.autotune(configs=_GPU_CONFIGS, key=_TUNE_KEY, reset_to_zero=reset)(kernel)


_TUNED = {}


def _run(kernel, grid, *args, **constexprs):
    """Launch ``kernel`` with the interpreter's fixed tiles or, on a GPU, autotuned ones."""
    if _INTERPRET:
        kernel[grid](*args, **constexprs, **_INTERPRETER_CONFIG, num_warps=4, num_stages=1)
        return
    if kernel not in _TUNED:
        _TUNED[kernel] = _autotuned(kernel)
    _TUNED[kernel][grid](*args, **constexprs)


def _tune_args(m, n, k, taps, stride):
    return _bucket(m), _bucket(n), _bucket(k), taps, stride


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` with channels_last strides (the layout the kernels read fastest): a copy only
    when it is not already so."""
    return t.contiguous(memory_format=torch.channels_last)


def conv2d_fwd_launch(input, weight, bias, residual, stride, padding, dilation, activation,
                      allow_tf32, out, z):
    """Write ``out`` = act(conv + bias + residual) and, if given, ``z`` (any strides)."""
    with _on_device(input):  # Triton launches on the current device; the tensors' is wanted
        _conv2d_fwd(input, weight, bias, residual, stride, padding, dilation, activation,
                    allow_tf32, out, z)


def _conv2d_fwd(input, weight, bias, residual, stride, padding, dilation, activation,
                allow_tf32, out, z):
    x, w = channels_last(input), channels_last(weight)
    n, c, h, width = x.shape
    k, _, r, s = w.shape
    oh, ow = out.shape[2:]
    m = n * oh * ow
    if m == 0 or k == 0:
        return

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_N"]),)

    _run(conv2d_fwd_kernel, grid,
         x, w, bias, residual, out, z, c, h, width, k, oh, ow, r, s, m,
         *_strides(x), *_strides(w), *_strides(residual), *_strides(out), *_strides(z),
         *stride, *padding, *dilation, *_tune_args(m, k, c * r * s, r * s, stride[0]),
         HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
         ACTIVATION=ACTIVATION_CODES[activation], STORE_Z=z is not None,
         INPUT_PRECISION=input_precision(x.dtype, allow_tf32))


def _weight_grad_splits(rows: int, tiles: int, device: torch.device) -> int:
    """How many programs share the reduction over ``rows`` output pixels."""
    if _INTERPRET:
        return max(1, triton.cdiv(rows, _INTERPRETER_SPLIT_ROWS))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = triton.cdiv(_WEIGHT_GRAD_PROGRAMS_PER_SM * sms, max(tiles, 1))
    return max(1, min(wanted, triton.cdiv(rows, _WEIGHT_GRAD_MIN_ROWS_PER_SPLIT)))


def conv2d_bwd_launch(grad_out, input, weight, saved, stride, padding, dilation, activation,
                      allow_tf32, grad_input, grad_weight, grad_bias, grad_preact):
    """Write each gradient that is not None (see conv_contract.py); deterministic."""
    with _on_device(input):
        _conv2d_bwd(grad_out, input, weight, saved, stride, padding, dilation, activation,
                    allow_tf32, grad_input, grad_weight, grad_bias, grad_preact)


def _conv2d_bwd(grad_out, input, weight, saved, stride, padding, dilation, activation,
                allow_tf32, grad_input, grad_weight, grad_bias, grad_preact):
    x, w = channels_last(input), channels_last(weight)
    g = channels_last(grad_out)
    saved = channels_last(saved) if activation != "none" else None
    n, c, h, width = x.shape
    k, _, r, s = w.shape
    oh, ow = g.shape[2:]
    code = ACTIVATION_CODES[activation]
    precision = input_precision(x.dtype, allow_tf32)
    rows = n * oh * ow
    if grad_input is not None and n * h * width > 0 and c > 0:
        m = n * h * width

        def input_grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(c, meta["BLOCK_N"]),)

        if rows == 0 or k == 0:
            grad_input.zero_()
        else:
            _run(conv2d_bwd_input_kernel, input_grid,
                 g, saved, w, grad_input, c, h, width, k, oh, ow, r, s, m,
                 *_strides(g), *_strides(saved), *_strides(w), *_strides(grad_input),
                 *stride, *padding, *dilation, *_tune_args(m, c, k * r * s, r * s, stride[0]),
                 ACTIVATION=code, INPUT_PRECISION=precision)
    wants = (grad_weight is not None, grad_bias is not None, grad_preact is not None)
    if not any(wants):
        return
    if rows == 0:
        for grad in (grad_weight, grad_bias):
            if grad is not None:
                grad.zero_()
        return
    compute_weight, store_bias, store_dz = wants
    # Without the weight gradient one tap and one channel tile produce dz and its sums.
    taps = r * s if compute_weight else 1
    channels_seen = c if compute_weight else 1
    config = _INTERPRETER_CONFIG if _INTERPRET else _WEIGHT_GRAD_CONFIG
    tiles = triton.cdiv(k, config["BLOCK_M"]) * triton.cdiv(channels_seen, config["BLOCK_N"])
    splits = _weight_grad_splits(rows, tiles * taps, x.device)
    block_rows = config["BLOCK_K"]
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), block_rows) * block_rows
    splits = triton.cdiv(rows, rows_per_split)
    dw_partial = (torch.empty((splits, k, r, s, c), dtype=torch.float32, device=x.device)
                  if compute_weight else None)
    db_partial = (torch.empty((splits, k), dtype=torch.float32, device=x.device)
                  if store_bias else None)
    grid = (tiles, taps, splits)
    args = (g, saved, x, dw_partial, db_partial, grad_preact, channels_seen, h, width, k, oh,
            ow, r, s, rows, rows_per_split, *_strides(g), *_strides(saved), *_strides(x),
            *_strides(grad_preact), *stride, *padding, *dilation,
            *_tune_args(k, c, rows, r * s, stride[0]))
    constexprs = dict(ACTIVATION=code, COMPUTE_WEIGHT=compute_weight, STORE_BIAS=store_bias,
                      STORE_DZ=store_dz, INPUT_PRECISION=precision)
    # One fixed tile: the grid (and the partial buffers) depend on it, so it is not tuned.
    conv2d_bwd_weight_kernel[grid](*args, **constexprs, **config,
                                   **({"num_warps": 4, "num_stages": 1} if _INTERPRET
                                      else _WEIGHT_GRAD_LAUNCH))
    if compute_weight:  # (SPLIT, K, R, S, C) summed in a fixed order, into the weight's layout
        grad_weight.copy_(dw_partial.sum(0).permute(0, 3, 1, 2))
    if store_bias:
        grad_bias.copy_(db_partial.sum(0))


# Unmeasured: a 128 x 128 (K x C) tile with 64 output pixels per step, the fused matmul's
# first configuration.
_WEIGHT_GRAD_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}
_WEIGHT_GRAD_LAUNCH = {"num_warps": 8, "num_stages": 3}

__all__ = ["channels_last", "conv2d_bwd_input_kernel", "conv2d_bwd_launch",
           "conv2d_bwd_weight_kernel", "conv2d_fwd_kernel", "conv2d_fwd_launch"]
