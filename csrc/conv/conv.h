// conv.h — plain C++ launchers of the convolution kernels: implicit GEMM on tensor cores
// (groups == 1) and a direct depthwise kernel (groups == C), forward and backward.
//
// Torch-free. Every activation-shaped tensor is NHWC (channels_last) with dense strides and
// every channel count of the implicit-GEMM kernels a multiple of 8 (bindings.cpp converts
// layouts and zero-pads channels: the documented slower path for other counts); weights are
// (K, R, S, C) ("KRSC", channels innermost). The semantics are
// python/fusedops/dispatch/conv_contract.py's:
//
//   z[n, oh, ow, k] = sum_{r, s, c} x[n, oh*stride_h - pad_h + r*dilation_h,
//                                        ow*stride_w - pad_w + s*dilation_w, c] * w[k, r, s, c]
//   (input pixels outside the image read as zero), out = act(z + bias + residual).
//
// As GEMMs (m = output pixels N*P*Q, n = K, depth = R*S*C):
//   forward      out (N*P*Q, K)   = im2col(x) (N*P*Q, R*S*C) @ w^T            epilogue fused
//   grad_input   dx  (N*H*W, C)   = sum over taps of dz (N*P*Q, K) @ w[:, r, s, :]
//                                   (each input pixel gathers the output pixels whose
//                                   window covers it: stride > 1 leaves some taps empty)
//   grad_weight  dw  (K, R*S*C)   = dz^T (K, N*P*Q) @ im2col(x), split over N*P*Q with
//                                   float32 partial sums
// dz = grad_out * act'(saved) and the bias gradient come from linear_bwd_prologue
// (csrc/matmul/gemm.h) on the (N*P*Q, K) view of grad_out.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "../matmul/gemm.h"

namespace fusedops {

struct ConvGeometry {
  int64_t batch, in_h, in_w, in_channels;  // x (N, H, W, C)
  int64_t out_channels;                    // K
  int kernel_h, kernel_w;                  // R, S
  int64_t out_h, out_w;                    // P, Q
  int stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
};

// Forward, groups == 1: out = act(conv(x, w) + bias + residual), the epilogue of gemm.h.
// type kFloat16, kBFloat16 or kFloat32, which the implicit-GEMM kernels multiply in tf32
// (operands rounded to tf32, products accumulated in float32): the caller runs float32 here
// only where tf32 is allowed (torch.backends.cudnn.allow_tf32; bindings.cpp refuses it
// otherwise). The same holds for dgrad and wgrad below. x (N, H, W, C), w (K, R, S, C), out
// and residual / preact (N, P, Q, K), all dense NHWC; C and K multiples of 8.
struct ConvFwdParams {
  ConvGeometry geometry;
  GemmType type;
  const void* input;
  const void* weight;
  const float* bias;          // (K,) float32 or nullptr
  const void* residual;       // (N, P, Q, K) or nullptr
  Activation activation;
  void* out;                  // (N, P, Q, K)
  void* preact;               // (N, P, Q, K) or nullptr
};

// grad_input (N, H, W, C) = the transposed convolution of dz (N, P, Q, K) with w.
struct ConvDgradParams {
  ConvGeometry geometry;
  GemmType type;
  const void* dz;             // (N, P, Q, K)
  const void* weight;         // (K, R, S, C)
  void* grad_input;           // (N, H, W, C), 16-byte aligned, every element written
};

// grad_weight (K, R, S, C) = dz^T @ im2col(x), in float32 `workspace` partials (split over
// the N*P*Q pixels in `splits` parts, summed in a fixed order), then cast to `type`.
struct ConvWgradParams {
  ConvGeometry geometry;
  GemmType type;
  const void* dz;             // (N, P, Q, K)
  const void* input;          // (N, H, W, C)
  void* grad_weight;          // (K, R, S, C) of `type`
  float* workspace;           // conv_wgrad_workspace_floats(...) floats
};

// The implicit-GEMM entry points. `path` (gemm.h's GemmPath) picks the kernel family: kAuto
// runs the sm_90a (wgmma) kernel where this build and the device have it and it covers the
// (op, type), else the sm_80 (mma.sync) one; kSm80 forces the latter (it runs on sm_90 too);
// kSm90 returns cudaErrorNotSupported where the sm_90a kernel cannot run. `ran`, when given,
// receives the path that ran.
bool conv_implicit_gemm_sm90_available(int device);
int64_t conv_wgrad_workspace_floats(const ConvGeometry& geometry);
cudaError_t conv_fwd(const ConvFwdParams& params, GemmPath path, cudaStream_t stream,
                     GemmPath* ran = nullptr);
cudaError_t conv_dgrad(const ConvDgradParams& params, GemmPath path, cudaStream_t stream,
                       GemmPath* ran = nullptr);
cudaError_t conv_wgrad(const ConvWgradParams& params, GemmPath path, cudaStream_t stream,
                       GemmPath* ran = nullptr);

// Depthwise (groups == C, channel multiplier M = K / C: output channel k reads input channel
// k / M), direct: memory-bound, 16-byte vectors along channels. x (N, H, W, C), w (K, R, S)
// (one R x S filter per output channel), out (N, P, Q, K), dense NHWC; any C.
struct DepthwiseFwdParams {
  ConvGeometry geometry;
  GemmType type;              // kFloat16, kBFloat16 or kFloat32 (exact float32 here)
  const void* input;
  const void* weight;
  const float* bias;
  const void* residual;
  Activation activation;
  void* out;
  void* preact;
};

struct DepthwiseBwdParams {
  ConvGeometry geometry;
  GemmType type;
  const void* dz;             // (N, P, Q, K): dz = grad_out * act'(z), formed by the caller
  const void* input;          // (N, H, W, C)
  const void* weight;         // (K, R, S)
  void* grad_input;           // (N, H, W, C) or nullptr
  float* grad_weight;         // (K, R, S) float32, or nullptr; written, not accumulated
  float* workspace;           // depthwise_bwd_workspace_floats(...) floats
};

int64_t depthwise_bwd_workspace_floats(const ConvGeometry& geometry);
cudaError_t depthwise_fwd(const DepthwiseFwdParams& params, cudaStream_t stream);
cudaError_t depthwise_bwd(const DepthwiseBwdParams& params, cudaStream_t stream);

}  // namespace fusedops
