// conv_implicit_gemm.h — between conv_implicit_gemm.cu (argument checks, the choice of kernel,
// the weight gradient's split and reduction) and the kernels of the two paths
// (conv_implicit_gemm_sm80.cu: mma.sync; conv_implicit_gemm_sm90.cu: wgmma). Internal: the
// public interface is conv.h.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../matmul/gemm.h"

namespace fusedops {
namespace conv_gemm {

// wgrad's pixels per split are a multiple of this (every type's block_k divides it).
constexpr int kSplitPixelAlign = 32;

enum class ConvOp : int { kFwd = 0, kDgrad = 1, kWgrad = 2 };

// What the kernels read, as 32-bit sizes where conv_implicit_gemm.cu has checked they fit
// (every intermediate of conv_gather.cuh stays within int: see geometry_ok there).
struct ConvKernelParams {
  int batch, in_h, in_w, in_c, out_c, taps_h, taps_w, out_h, out_w;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t m, n;          // the GEMM's rows and columns
  int depth;             // fwd: R*S*C; dgrad: R*S*K; wgrad: N*P*Q (the pixels)
  int rsc;               // R*S*C: the weight's row length
  int pixels;            // N*P*Q
  int split_pixels;      // wgrad: pixels per split (grid y), a multiple of kSplitPixelAlign
  int64_t split_floats;  // wgrad: K*R*S*C, one split's partials
  const void* act;       // fwd, wgrad: x; dgrad: dz
  const void* other;     // fwd, dgrad: w; wgrad: dz
  GemmParams epi;        // the epilogue's view (out, ld, bias, residual, activation)
  // dgrad: the stride phase one launch covers (conv_gather.cuh's top comment; stride 1 is
  // the one phase of every pixel and tap). GEMM row (n, i, j), n-major, is input pixel
  // (n, phase_h0 + i*stride_h, phase_w0 + j*stride_w) with i < phase_rows, j < phase_cols.
  // Depth (t_r, t_s, k), k fastest, with t_r < phase_taps_h, t_s < phase_taps_w, is the
  // weight tap r*S + s = phase_tap0 + t_r*phase_tap_step_r + t_s*phase_tap_step_s (the
  // phase's taps are r = r0 + t_r*r_step, s = s0 + t_s*s_step: phase_tap0 = r0*S + s0, and
  // the steps r_step*S and s_step, 0 where the phase has one tap along the axis). Row i at
  // t_r reads dz row phase_oh0 + i - t_r*phase_oh_step (columns likewise).
  int phase_h0, phase_w0, phase_rows, phase_cols;
  int phase_taps_h, phase_taps_w, phase_tap0, phase_tap_step_r, phase_tap_step_s;
  int phase_oh0, phase_ow0, phase_oh_step, phase_ow_step;
};

// The k blocks (of `block_k` depth) a CTA runs: the whole depth for fwd and dgrad, its own
// split's pixels for wgrad (the last split may be short).
__host__ __device__ inline int conv_k_blocks(const ConvKernelParams& p, ConvOp op, int split,
                                             int block_k) {
  if (op != ConvOp::kWgrad) return (p.depth + block_k - 1) / block_k;
  const int64_t begin = static_cast<int64_t>(split) * p.split_pixels;
  int64_t left = p.pixels - begin;
  left = left < p.split_pixels ? left : p.split_pixels;
  return left <= 0 ? 0 : static_cast<int>((left + block_k - 1) / block_k);
}

// The sm_80 kernels (they also run on sm_90). Grid: the output tiles x `splits` (1 but for
// wgrad, whose float32 partials go to epi.out + split * split_floats).
cudaError_t conv_sm80_launch(ConvOp op, GemmType type, const ConvKernelParams& params,
                             int splits, cudaStream_t stream);

// The sm_90a kernels: whether this build has them and `device` runs them, which (op, type)
// pairs they cover, and the launch (same grid and outputs as the sm_80 one).
bool conv_sm90_runs(int device);
bool conv_sm90_covers(ConvOp op, GemmType type);
cudaError_t conv_sm90_launch(ConvOp op, GemmType type, const ConvKernelParams& params,
                             int splits, cudaStream_t stream);

}  // namespace conv_gemm
}  // namespace fusedops
