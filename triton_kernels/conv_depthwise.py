"""Depthwise convolution with a fused epilogue, ``act(conv2d(x, W, groups=C) + b + r)``, and its
backward: memory-bound kernels that read NHWC tiles with channel-contiguous vector loads.

The math. Depthwise means ``groups == C``: output channel ``k`` (of ``K = C * multiplier``)
reads only input channel ``c = k // multiplier``, through its own ``R x S`` filter:

    z[n, k, oh, ow] = sum_{r, s} x[n, c, oh*sh - ph + r*dh, ow*sw - pw + s*dw] * W[k, 0, r, s]
                      + b[k] + residual[n, k, oh, ow]            (rows/cols outside x read 0)
    out = act(z)

Backward, with ``dz = grad_out * act'(z)`` (act' from z, or from out for relu):

    grad_bias[k]         = sum_{n, oh, ow} dz[n, k, oh, ow]
    grad_weight[k, r, s] = sum_{n, oh, ow} dz[n, k, oh, ow] * x[n, c, ih(oh, r), iw(ow, s)]
    grad_input[n, c, ih, iw] = sum_{m < multiplier} sum_{r, s} dz[n, c*multiplier + m, oh, ow]
                                                                * W[c*multiplier + m, 0, r, s]
        over the taps that reach (ih, iw): oh = (ih + ph - r*dh) / sh exactly (the remainder
        is 0) and 0 <= oh < OH, likewise ow.

Why these kernels look the way they do. There is no reduction across channels, so nothing
for tensor cores: every input element feeds R*S products, every weight N*OH*OW of them, and
the op is bound by memory bandwidth (2*R*S FLOPs per output against 2-3 elements moved: a
3x3 bf16 layer does ~5 FLOPs per byte, where an H100's CUDA cores need ~20 — 67 TFLOP/s of
float32 FMA over 3.35 TB/s — to be compute-bound). So the goal is "each byte from DRAM once,
in wide loads, and little arithmetic per element", and that decides the design:

* NHWC. A program owns a block of BLOCK_P output pixels (flattened ``(n, oh, ow)``, so a
  block runs along output rows) by a block of BLOCK_C channels. With channels_last tensors
  (``stride(1) == 1``, which Triton specialises as a constant) the channels of one pixel are
  contiguous, so each thread loads 8 (16-bit) or 4 (fp32) neighbouring channels in one
  128-bit access when the channel count and strides are multiples of 16 elements. Any other
  strides (NCHW included) are correct, with narrower accesses. The R*S shifted tiles of one
  program overlap, and the halo rows of neighbouring pixel blocks are read again by the
  program next door (``program_id(0)`` is the pixel block, so neighbours run together): those
  re-reads hit L1/L2, not DRAM.
* R, S and the multiplier are compile-time constants. The S taps of a filter row unroll, so
  their loads are independent and in flight together (what covers DRAM latency); the rows
  run in a loop. Unrolling all R*S taps gave ptxas (sm_90) 170-255 registers, and spills
  in the gather, for no more useful bytes in flight.
* Forward: one kernel, ``acc[p, k] += x_tap[p, k // multiplier] * W[k, tap]`` over the taps,
  then the epilogue in registers: + bias, + residual (both upcast), store z when backward
  needs it (gelu, gelu_tanh, silu), act, store out. The weights are read per tap as a
  (BLOCK_C,) vector with the weight's own strides: K*R*S elements, L1-resident.
* Weight and bias gradients (``depthwise_bwd_weight_kernel``): a reduction over N*OH*OW,
  split into ``splits`` contiguous pixel ranges. A program owns (pixel range, channel block,
  block of TAP_BLOCK taps); per step it loads a dz tile (BLOCK_P, BLOCK_C) — grad_out times
  act'(saved), formed as loaded — and the patch tile x[(pixel, tap, channel)] (BLOCK_P,
  TAP_BLOCK, BLOCK_C) of the taps it owns, and accumulates their product elementwise; the
  sum over pixels happens once, at the end. It writes float32 partial sums
  ``(splits, R*S, K)`` that the launcher sums over the splits (a tiny torch reduction) and
  casts into grad_weight: no atomics, so the result is deterministic. The programs of the
  first tap block also write dz (grad_preact) and the bias partial sums, so each dz element
  is written once and grad_out/saved are read once when R*S <= TAP_BLOCK (3x3, 5x5; a 7x7
  filter is two tap blocks and reads them twice, the second time mostly from L2).
  Why a (pixel, tap, channel) tile and not a loop over taps: a per-tap loop would need R*S
  separate accumulators or a cross-thread reduction over pixels after every tap; the 3-D
  tile keeps one accumulator and one reduction per program. (The compiler forms dz once per
  element in a 2-D layout and moves it through shared memory to broadcast it over the taps;
  act' is not recomputed per tap.)
* Input gradient (``depthwise_bwd_input_kernel``): a gather, never a scatter — a program owns
  a block of *input* pixels by a block of input channels and visits, for each of the
  multiplier's output channels and each tap, the one output pixel that tap reaches, if any
  (stride > 1: only taps whose row/column offset is divisible by the stride, a mask). Each
  dz element is wanted by up to R*S input pixels, so where dz comes from matters:
  - grad_preact asked for: the weight kernel has written dz there; the gather reads it.
  - "none" / "relu" (act' is a compare at most): the gather forms dz from grad_out (and
    out) as it loads them, at every tap.
  - gelu, gelu_tanh, silu: act' costs 10-30 instructions; forming it R*S times per element
    would make the gather compute-bound (9 x ~30 instructions per 6 bytes for a 3x3 gelu,
    against the ~10 per byte an H100 issues at full bandwidth), and all those live values
    pushed ptxas to 255 registers and spills. Instead the weight kernel, which forms dz
    once per element anyway, writes it into a scratch tensor like grad_out, and the gather
    reads that. The DRAM traffic is the same as re-reading grad_out and z (one write and
    one read of dz instead of two reads); the price is a scratch of grad_out's size. dz is
    rounded to grad_out's dtype there, as the fused linear rounds dz to the operand dtype
    of its grad_input product.

Bytes (b bytes per element, P = N*OH*OW output pixels, Q = N*H*W input pixels):
    forward    reads Q*C*b (+ P*K*b residual), writes P*K*b (+ P*K*b z)
    backward   weight kernel reads P*K*b grad_out (+ P*K*b saved) and Q*C*b x, writes
               P*K*b dz when grad_preact is asked for or the gather needs it; the gather
               reads P*K*b (dz, or grad_out + out for relu) and writes Q*C*b

Multiplier > 1 is correct in every kernel, with narrower accesses: output channel k reads input
channel k // multiplier, so no tile is one contiguous run of both.

Indices. Pixel indices are int32 (the launchers refuse more than 2**31 - 1 pixels, a case for
the torch tier); every memory offset is formed in int64 from them, so tensors of more than
2**31 elements are fine.

Configurations. Under ``TRITON_INTERPRET=1`` one fixed configuration per kernel (no autotune,
no device query; the interpreter pays per program instance, so its blocks are large). On a
GPU a short autotuned list per kernel, pruned to blocks no wider than the channel count.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .matmul import ACTIVATION_CODES, _activation, _activation_derivative, _on_device

# Pixel indices are int32 inside the kernels (offsets are int64).
MAX_PIXELS = 2**31 - 1

# --- configuration -------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Under the interpreter: few, large programs (it costs ~0.6 ms per program instance and per
# tile op, whatever the tile size). The weight-gradient split is small on purpose, so that
# the tests' sizes (a few hundred output pixels) cover more than one split.
INTERPRETER_FWD_CONFIG = {"BLOCK_P": 128, "BLOCK_C": 16}
INTERPRETER_INPUT_CONFIG = {"BLOCK_P": 128, "BLOCK_C": 16}
INTERPRETER_WEIGHT_ROWS, INTERPRETER_WEIGHT_BLOCK_C = 512, 16  # rows = BLOCK_P * TAP_BLOCK
INTERPRETER_PIXELS_PER_SPLIT = 128

# NOT yet measured on a GPU: to be replaced by what benchmarks/ measures, with the result
# file cited here. (BLOCK_P, BLOCK_C, num_warps), chosen so that each thread owns 16
# elements of a tile, two 128-bit accesses of 16-bit data per tap: ptxas (sm_90, Triton 3.8)
# gives these 100-170 registers and no spills for the forward (3x3 to 7x7, gelu epilogue)
# and the input gather, where 32 elements per thread reached 255 registers (and spilled in
# the gather). The four trade pixels for channels: 32-wide layers to 128+-wide ones.
GPU_TILES = [(32, 64, 4), (64, 64, 8), (64, 32, 4), (16, 128, 4)]
# The weight-gradient tile is (BLOCK_P, TAP_BLOCK, BLOCK_C) with BLOCK_P = rows // TAP_BLOCK
# pixels per step: (rows, BLOCK_C, num_warps), 4096-16384 float32 accumulators per program
# (the first has no spills in fp32 either; 128x64 spills 12 bytes there).
GPU_WEIGHT_TILES = [(128, 32, 4), (128, 64, 4), (64, 128, 4), (256, 64, 8)]
# Taps per weight-gradient program: 16 holds a 3x3 filter, 32 a 5x5 (a 7x7 is two blocks).
MAX_TAP_BLOCK = 32
# Weight-gradient programs to aim for on a GPU, per SM: enough to fill it, while each
# program still reduces a long pixel range in registers (fewer partial sums to add up).
WEIGHT_PROGRAMS_PER_SM = 4
MIN_PIXELS_PER_SPLIT = 256
# Activations whose derivative the input-gradient gather recomputes at every tap (a compare
# at most); for the others it reads a dz the weight kernel wrote.
CHEAP_DERIVATIVES = ("none", "relu")


def _prune_tiles(configs, named_args, **kwargs):
    """Drop channel blocks wider than the channel count (a 128-wide block for 32 channels only
    wastes lanes); keep at least one."""
    channels = named_args["CHANNEL_BLOCKED"]
    kept = [c for c in configs
            if c.kwargs["BLOCK_C"] <= max(32, triton.next_power_of_2(channels))]
    return kept or configs[-1:]


# --- forward -------------------------------------------------------------------------------


@triton.jit
def depthwise_fwd_kernel(
        x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, z_ptr,
        PIXELS, H, W, OH, OW, K, CHANNEL_BLOCKED,
        stride_xn, stride_xc, stride_xh, stride_xw,
        stride_wk, stride_wr, stride_ws, stride_bias,
        stride_rn, stride_rk, stride_rh, stride_rw,
        stride_on, stride_ok, stride_oh, stride_ow,
        stride_zn, stride_zk, stride_zh, stride_zw,
        conv_stride_h, conv_stride_w, pad_h, pad_w, dilation_h, dilation_w,
        tune_key_pixels,  # autotuning key (power-of-2 bucket of PIXELS); unused
        R: tl.constexpr, S: tl.constexpr, MULTIPLIER: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, STORE_Z: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid (pixel blocks, channel blocks): out and z of BLOCK_P output pixels x BLOCK_C
    output channels. CHANNEL_BLOCKED is K (the dimension the channel blocks tile)."""
    pixels = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pixel_ok = pixels < PIXELS
    channel_ok = channels < K
    ow = pixels % OW
    oh = (pixels // OW) % OH
    n64 = (pixels // (OW * OH)).to(tl.int64)
    top = oh * conv_stride_h - pad_h   # the input row of tap r = 0
    left = ow * conv_stride_w - pad_w
    channels64 = channels.to(tl.int64)
    if MULTIPLIER == 1:  # kept apart so the channel offsets stay visibly contiguous
        x_channel = channels64 * stride_xc
    else:
        x_channel = (channels // MULTIPLIER).to(tl.int64) * stride_xc
    w_channel = w_ptr + channels64 * stride_wk
    x_batch = x_ptr + n64 * stride_xn

    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for r in range(R):  # rows in a loop, columns unrolled: S taps of loads in flight
        ih = top + r * dilation_h
        row_ok = pixel_ok & (ih >= 0) & (ih < H)
        x_row = x_batch + ih.to(tl.int64) * stride_xh
        for s in tl.static_range(S):
            iw = left + s * dilation_w
            tap_ok = row_ok & (iw >= 0) & (iw < W)
            x = tl.load((x_row + iw.to(tl.int64) * stride_xw)[:, None] + x_channel[None, :],
                        mask=tap_ok[:, None] & channel_ok[None, :], other=0.0)
            w = tl.load(w_channel + (r * stride_wr + s * stride_ws), mask=channel_ok, other=0.0)
            acc += x.to(tl.float32) * w.to(tl.float32)[None, :]

    mask = pixel_ok[:, None] & channel_ok[None, :]
    oh64 = oh.to(tl.int64)
    ow64 = ow.to(tl.int64)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + channels64 * stride_bias, mask=channel_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        res_pixel = n64 * stride_rn + oh64 * stride_rh + ow64 * stride_rw
        residual = tl.load(res_ptr + res_pixel[:, None] + channels64[None, :] * stride_rk,
                           mask=mask, other=0.0)
        acc += residual.to(tl.float32)
    if STORE_Z:
        z_pixel = n64 * stride_zn + oh64 * stride_zh + ow64 * stride_zw
        tl.store(z_ptr + z_pixel[:, None] + channels64[None, :] * stride_zk,
                 acc.to(z_ptr.dtype.element_ty), mask=mask)
    out_pixel = n64 * stride_on + oh64 * stride_oh + ow64 * stride_ow
    tl.store(out_ptr + out_pixel[:, None] + channels64[None, :] * stride_ok,
             _activation(acc, ACTIVATION).to(out_ptr.dtype.element_ty), mask=mask)


# --- backward: dz, its sums over pixels, and the weight gradient ---------------------------


@triton.jit
def _load_dz(grad_out_ptr, saved_ptr, grad_pixel, saved_pixel, grad_channel, saved_channel,
             mask, ACTIVATION: tl.constexpr):
    """dz = grad_out * act'(saved) in float32 for one (pixels, channels) tile; 0 where masked.
    ``saved`` is read only when there is an activation."""
    grad = tl.load(grad_out_ptr + grad_pixel[:, None] + grad_channel[None, :], mask=mask,
                   other=0.0).to(tl.float32)
    if ACTIVATION != 0:
        saved = tl.load(saved_ptr + saved_pixel[:, None] + saved_channel[None, :], mask=mask,
                        other=0.0).to(tl.float32)
        grad = grad * _activation_derivative(saved, ACTIVATION)
    return grad


@triton.jit
def depthwise_bwd_weight_kernel(
        grad_out_ptr, saved_ptr, x_ptr, dz_ptr, partial_weight_ptr, partial_bias_ptr,
        PIXELS, H, W, OH, OW, K, CHANNEL_BLOCKED, pixels_per_split,
        stride_gn, stride_gk, stride_gh, stride_gw,
        stride_sn, stride_sk, stride_sh, stride_sw,
        stride_xn, stride_xc, stride_xh, stride_xw,
        stride_dn, stride_dk, stride_dh, stride_dw,
        conv_stride_h, conv_stride_w, pad_h, pad_w, dilation_h, dilation_w,
        tune_key_pixels,  # autotuning key; unused
        R: tl.constexpr, S: tl.constexpr, MULTIPLIER: tl.constexpr, ACTIVATION: tl.constexpr,
        COMPUTE_WEIGHT: tl.constexpr, STORE_BIAS: tl.constexpr, STORE_DZ: tl.constexpr,
        TAP_BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid (splits, channel blocks, tap blocks). Over its pixel range a program sums
    dz * x for TAP_BLOCK taps into partial_weight[split, tap, k] (float32, contiguous
    (splits, R*S, K)); the programs of tap block 0 also write dz and partial_bias[split, k]."""
    split = tl.program_id(0)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tap_block = tl.program_id(2)
    channel_ok = channels < K
    channels64 = channels.to(tl.int64)
    if MULTIPLIER == 1:
        x_channel = channels64 * stride_xc
    else:
        x_channel = (channels // MULTIPLIER).to(tl.int64) * stride_xc
    grad_channel = channels64 * stride_gk
    saved_channel = channels64 * stride_sk
    # Only the first tap block writes dz and the bias sums: each element exactly once.
    side_writer = tap_block == 0

    taps = tap_block * TAP_BLOCK + tl.arange(0, TAP_BLOCK)
    tap_ok = taps < R * S
    tap_dh = (taps // S) * dilation_h  # row offset of each tap from the window's top
    tap_dw = (taps % S) * dilation_w

    first = split * pixels_per_split
    last = tl.minimum(first + pixels_per_split, PIXELS)
    weight_acc = tl.zeros((BLOCK_P, TAP_BLOCK, BLOCK_C), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for block_start in range(first, last, BLOCK_P):
        pixels = block_start + tl.arange(0, BLOCK_P)
        pixel_ok = pixels < last
        ow = pixels % OW
        oh = (pixels // OW) % OH
        n64 = (pixels // (OW * OH)).to(tl.int64)
        oh64 = oh.to(tl.int64)
        ow64 = ow.to(tl.int64)
        mask = pixel_ok[:, None] & channel_ok[None, :]
        dz = _load_dz(grad_out_ptr, saved_ptr,
                      n64 * stride_gn + oh64 * stride_gh + ow64 * stride_gw,
                      n64 * stride_sn + oh64 * stride_sh + ow64 * stride_sw,
                      grad_channel, saved_channel, mask, ACTIVATION)
        if STORE_DZ:
            dz_pixel = n64 * stride_dn + oh64 * stride_dh + ow64 * stride_dw
            tl.store(dz_ptr + dz_pixel[:, None] + channels64[None, :] * stride_dk,
                     dz.to(dz_ptr.dtype.element_ty), mask=mask & side_writer)
        if STORE_BIAS:
            bias_acc += dz
        if COMPUTE_WEIGHT:
            # The patch tile: x at (pixel, tap) positions, (BLOCK_P, TAP_BLOCK), by channel.
            ih = (oh * conv_stride_h - pad_h)[:, None] + tap_dh[None, :]
            iw = (ow * conv_stride_w - pad_w)[:, None] + tap_dw[None, :]
            patch_ok = (pixel_ok[:, None] & tap_ok[None, :] & (ih >= 0) & (ih < H)
                        & (iw >= 0) & (iw < W))
            patch = (n64[:, None] * stride_xn + ih.to(tl.int64) * stride_xh
                     + iw.to(tl.int64) * stride_xw)
            x = tl.load(x_ptr + patch[:, :, None] + x_channel[None, None, :],
                        mask=patch_ok[:, :, None] & channel_ok[None, None, :], other=0.0)
            weight_acc += x.to(tl.float32) * dz[:, None, :]

    if COMPUTE_WEIGHT:
        weight_sum = tl.sum(weight_acc, axis=0)  # (TAP_BLOCK, BLOCK_C)
        rows = split.to(tl.int64) * (R * S) + taps.to(tl.int64)
        tl.store(partial_weight_ptr + rows[:, None] * K + channels64[None, :], weight_sum,
                 mask=tap_ok[:, None] & channel_ok[None, :])
    if STORE_BIAS:
        tl.store(partial_bias_ptr + split.to(tl.int64) * K + channels64,
                 tl.sum(bias_acc, axis=0), mask=channel_ok & side_writer)


# --- backward: the input gradient, a gather over the taps that reach each input pixel ------


@triton.jit
def depthwise_bwd_input_kernel(
        grad_out_ptr, saved_ptr, w_ptr, grad_in_ptr,
        PIXELS, H, W, OH, OW, C, CHANNEL_BLOCKED,
        stride_gn, stride_gk, stride_gh, stride_gw,
        stride_sn, stride_sk, stride_sh, stride_sw,
        stride_wk, stride_wr, stride_ws,
        stride_in, stride_ic, stride_ih, stride_iw,
        conv_stride_h, conv_stride_w, pad_h, pad_w, dilation_h, dilation_w,
        tune_key_pixels,  # autotuning key; unused
        R: tl.constexpr, S: tl.constexpr, MULTIPLIER: tl.constexpr, ACTIVATION: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid (input pixel blocks, input channel blocks): grad_input of BLOCK_P input pixels
    (PIXELS = N*H*W of them) x BLOCK_C input channels. CHANNEL_BLOCKED is C."""
    pixels = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pixel_ok = pixels < PIXELS
    channel_ok = in_channels < C
    iw = pixels % W
    ih = (pixels // W) % H
    n64 = (pixels // (W * H)).to(tl.int64)
    grad_batch = n64 * stride_gn
    saved_batch = n64 * stride_sn

    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for m in tl.static_range(MULTIPLIER):
        if MULTIPLIER == 1:
            out_channels64 = in_channels.to(tl.int64)
        else:
            out_channels64 = (in_channels * MULTIPLIER + m).to(tl.int64)
        grad_channel = out_channels64 * stride_gk
        saved_channel = out_channels64 * stride_sk
        w_channel = w_ptr + out_channels64 * stride_wk
        for r in range(R):  # rows in a loop, columns unrolled: S taps of loads in flight
            # Tap r of output row oh reads input row oh*sh - ph + r*dh: this input row is
            # reached from oh = (ih + ph - r*dh) / sh when that division is exact.
            reach_h = ih + pad_h - r * dilation_h
            oh = reach_h // conv_stride_h
            row_ok = (pixel_ok & (reach_h >= 0) & (reach_h % conv_stride_h == 0)
                      & (oh < OH))
            oh64 = oh.to(tl.int64)
            grad_row = grad_batch + oh64 * stride_gh
            saved_row = saved_batch + oh64 * stride_sh
            for s in tl.static_range(S):
                reach_w = iw + pad_w - s * dilation_w
                ow = reach_w // conv_stride_w
                tap_ok = (row_ok & (reach_w >= 0) & (reach_w % conv_stride_w == 0)
                          & (ow < OW))
                ow64 = ow.to(tl.int64)
                dz = _load_dz(grad_out_ptr, saved_ptr, grad_row + ow64 * stride_gw,
                              saved_row + ow64 * stride_sw, grad_channel, saved_channel,
                              tap_ok[:, None] & channel_ok[None, :], ACTIVATION)
                w = tl.load(w_channel + (r * stride_wr + s * stride_ws), mask=channel_ok,
                            other=0.0)
                acc += dz * w.to(tl.float32)[None, :]

    in_pixel = n64 * stride_in + ih.to(tl.int64) * stride_ih + iw.to(tl.int64) * stride_iw
    tl.store(grad_in_ptr + in_pixel[:, None] + in_channels.to(tl.int64)[None, :] * stride_ic,
             acc.to(grad_in_ptr.dtype.element_ty),
             mask=pixel_ok[:, None] & channel_ok[None, :])


# --- launchers -----------------------------------------------------------------------------

_TUNE_KEY = ["tune_key_pixels", "CHANNEL_BLOCKED", "R", "S", "MULTIPLIER"]


def _tile_configs(tiles):
    return [triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w) for p, c, w in tiles]


depthwise_fwd_autotuned = triton.autotune(
    configs=_tile_configs(GPU_TILES), key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": _prune_tiles})(depthwise_fwd_kernel)
depthwise_bwd_input_autotuned = triton.autotune(
    configs=_tile_configs(GPU_TILES), key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": _prune_tiles})(depthwise_bwd_input_kernel)


def weight_tiles(tap_block: int, tiles=None):
    """(BLOCK_P, BLOCK_C, num_warps) of the weight-gradient kernel for a tap block size."""
    tiles = GPU_WEIGHT_TILES if tiles is None else tiles
    unique = dict.fromkeys((max(1, rows // tap_block), c, w) for rows, c, w in tiles)
    return list(unique)


@functools.cache
def _weight_autotuned(tap_block: int):
    # Every launch overwrites what it writes (partial sums, dz), so trials need no reset.
    return triton.autotune(configs=_tile_configs(weight_tiles(tap_block)), key=_TUNE_KEY,
                           prune_configs_by={"early_config_prune": _prune_tiles})(
        depthwise_bwd_weight_kernel)


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _strides4(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def _bucket(size: int) -> int:
    return triton.next_power_of_2(max(size, 1))


def _check_pixels(count: int, what: str) -> None:
    if count > MAX_PIXELS:
        raise ValueError(f"depthwise conv: {count} {what} pixels; the kernels index pixels in "
                         f"32 bits (at most {MAX_PIXELS}): use the torch tier")


def _launch(kernel, autotuned, interpreter_config, grid, args, flags):
    """The fixed interpreter configuration, or the autotuned kernel on a GPU."""
    if _interpreting():
        meta = dict(interpreter_config)
        kernel[grid(meta)](*args, **flags, **meta)
    else:
        autotuned[grid](*args, **flags)


def depthwise_fwd_launch(input, weight, bias, residual, stride, padding, dilation, activation,
                         out, z):
    """out = act(z), z = depthwise conv(input, weight) + bias + residual (float32 inside).

    input (N, C, H, W) any strides (fast: channels_last); weight (K, 1, R, S), K = C * m;
    bias (K,) or None; residual (N, K, OH, OW) or None; stride, padding (top, left),
    dilation: (h, w) pairs; OH, OW = out.shape[2:]; out and z (or None) any strides.
    """
    batch, channels, height, width = input.shape
    out_channels, _, kernel_h, kernel_w = weight.shape
    out_h, out_w = out.shape[2], out.shape[3]
    pixels = batch * out_h * out_w
    if pixels == 0 or out_channels == 0:
        return
    _check_pixels(pixels, "output")
    args = (input, weight, bias if bias is not None else out,
            residual if residual is not None else out, out, z if z is not None else out,
            pixels, height, width, out_h, out_w, out_channels, out_channels,
            *input.stride(), weight.stride(0), weight.stride(2), weight.stride(3),
            bias.stride(0) if bias is not None else 0,
            *_strides4(residual), *out.stride(), *_strides4(z),
            *stride, *padding, *dilation, _bucket(pixels))
    flags = dict(R=kernel_h, S=kernel_w, MULTIPLIER=out_channels // channels,
                 HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                 ACTIVATION=ACTIVATION_CODES[activation], STORE_Z=z is not None)

    def grid(meta):
        return (triton.cdiv(pixels, meta["BLOCK_P"]), triton.cdiv(out_channels, meta["BLOCK_C"]))

    with _on_device(input):
        _launch(depthwise_fwd_kernel, depthwise_fwd_autotuned, INTERPRETER_FWD_CONFIG, grid,
                args, flags)


def _splits(pixels: int, out_channels: int, tap_blocks: int, device: torch.device) -> int:
    """How many pixel ranges the weight-gradient reduction is split into."""
    if _interpreting():
        return triton.cdiv(pixels, INTERPRETER_PIXELS_PER_SPLIT)
    index = device.index if device.index is not None else torch.cuda.current_device()
    target = WEIGHT_PROGRAMS_PER_SM * _multiprocessors(index)
    # Channel blocks counted at 64 wide, the middle of the tuned range.
    per_split = triton.cdiv(out_channels, 64) * tap_blocks
    return max(1, min(triton.cdiv(target, per_split),
                      triton.cdiv(pixels, MIN_PIXELS_PER_SPLIT)))


def depthwise_bwd_launch(grad_out, input, weight, saved, stride, padding, dilation, activation,
                         grad_input, grad_weight, grad_bias, grad_preact):
    """The gradients of depthwise_fwd_launch; each output may be None (not wanted).

    dz = grad_out * act'(saved) is formed as tiles are loaded (saved: z for gelu, gelu_tanh,
    silu; out for relu; ignored for "none"). grad_input like input, grad_weight (K, 1, R, S)
    and grad_bias (K,) from deterministic float32 split sums, grad_preact = dz.

    Two kernels, in this order on the stream: the weight kernel (dz, grad_preact, the bias and
    weight partial sums) and the input-gradient gather. The gather reads dz from grad_preact
    when that was asked for; else it forms dz itself when act' is cheap ("none", "relu");
    else (gelu, gelu_tanh, silu) the weight kernel writes dz into a scratch tensor like
    grad_out for it (see the module docstring).
    """
    batch, channels, height, width = input.shape
    out_channels, _, kernel_h, kernel_w = weight.shape
    out_h, out_w = grad_out.shape[2], grad_out.shape[3]
    out_pixels = batch * out_h * out_w
    in_pixels = batch * height * width
    if ACTIVATION_CODES[activation] == 0:
        saved = None  # "none" saves nothing (the caller may pass an empty tensor)
    if out_pixels == 0 or out_channels == 0:  # no output: every sum over it is zero
        for grad in (grad_input, grad_weight, grad_bias):
            if grad is not None:
                grad.zero_()
        return
    _check_pixels(max(out_pixels, in_pixels), "input/output")
    geometry = (*stride, *padding, *dilation)
    shape = dict(R=kernel_h, S=kernel_w, MULTIPLIER=out_channels // channels)

    # Where the gather finds dz: (tensor, its act' to apply, the tensor act' reads).
    dz_store = grad_preact
    if grad_input is None or in_pixels == 0:
        gather_source = None
    elif grad_preact is not None:
        gather_source = (grad_preact, "none", None)
    elif activation in CHEAP_DERIVATIVES:
        gather_source = (grad_out, activation, saved)
    else:
        dz_store = torch.empty_like(grad_out)
        gather_source = (dz_store, "none", None)

    with _on_device(input):
        if grad_weight is not None or grad_bias is not None or dz_store is not None:
            _weight_kernel(grad_out, input, saved, activation, geometry, shape, grad_weight,
                           grad_bias, dz_store)
        if gather_source is not None:
            source, source_activation, source_saved = gather_source
            args = (source, source_saved if source_saved is not None else source, weight,
                    grad_input, in_pixels, height, width, out_h, out_w, channels, channels,
                    *source.stride(), *_strides4(source_saved), weight.stride(0),
                    weight.stride(2), weight.stride(3), *grad_input.stride(), *geometry,
                    _bucket(in_pixels))
            flags = dict(shape, ACTIVATION=ACTIVATION_CODES[source_activation])

            def grid(meta):
                return (triton.cdiv(in_pixels, meta["BLOCK_P"]),
                        triton.cdiv(channels, meta["BLOCK_C"]))

            _launch(depthwise_bwd_input_kernel, depthwise_bwd_input_autotuned,
                    INTERPRETER_INPUT_CONFIG, grid, args, flags)


def _weight_kernel(grad_out, input, saved, activation, geometry, shape, grad_weight, grad_bias,
                   dz_store):
    """The weight-gradient kernel (dz into dz_store, the bias and weight partial sums per
    split), then the sums over splits, cast into grad_weight and grad_bias."""
    out_channels, out_h, out_w = grad_out.shape[1], grad_out.shape[2], grad_out.shape[3]
    pixels = input.shape[0] * out_h * out_w
    taps = shape["R"] * shape["S"]
    compute_weight = grad_weight is not None
    tap_block = min(triton.next_power_of_2(taps), MAX_TAP_BLOCK) if compute_weight else 1
    tap_blocks = triton.cdiv(taps, tap_block) if compute_weight else 1
    pixels_per_split = triton.cdiv(pixels, _splits(pixels, out_channels, tap_blocks,
                                                   input.device))
    splits = triton.cdiv(pixels, pixels_per_split)
    f32 = dict(dtype=torch.float32, device=input.device)
    partial_weight = torch.empty((splits, taps, out_channels), **f32) if compute_weight \
        else None
    partial_bias = torch.empty((splits, out_channels), **f32) if grad_bias is not None \
        else None

    def or_anchor(t):  # an unused pointer argument still needs a tensor
        return t if t is not None else grad_out

    args = (grad_out, or_anchor(saved), input, or_anchor(dz_store), or_anchor(partial_weight),
            or_anchor(partial_bias), pixels, input.shape[2], input.shape[3], out_h, out_w,
            out_channels, out_channels, pixels_per_split, *grad_out.stride(),
            *_strides4(saved), *input.stride(), *_strides4(dz_store), *geometry,
            _bucket(pixels))
    flags = dict(shape, ACTIVATION=ACTIVATION_CODES[activation], COMPUTE_WEIGHT=compute_weight,
                 STORE_BIAS=grad_bias is not None, STORE_DZ=dz_store is not None,
                 TAP_BLOCK=tap_block)

    def grid(meta):
        return (splits, triton.cdiv(out_channels, meta["BLOCK_C"]), tap_blocks)

    if _interpreting():
        meta = {"BLOCK_P": max(1, INTERPRETER_WEIGHT_ROWS // tap_block),
                "BLOCK_C": INTERPRETER_WEIGHT_BLOCK_C}
        depthwise_bwd_weight_kernel[grid(meta)](*args, **flags, **meta)
    else:
        _weight_autotuned(tap_block)[grid](*args, **flags)
    if compute_weight:
        # (splits, R*S, K) -> (K, R*S): a deterministic float32 sum, then the cast.
        grad_weight.copy_(partial_weight.sum(0).t().reshape(grad_weight.shape))
    if grad_bias is not None:
        grad_bias.copy_(partial_bias.sum(0))


__all__ = ["ACTIVATION_CODES", "depthwise_bwd_input_kernel", "depthwise_bwd_launch",
           "depthwise_bwd_weight_kernel", "depthwise_fwd_kernel", "depthwise_fwd_launch"]
