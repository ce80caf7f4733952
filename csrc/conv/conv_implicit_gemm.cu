// conv_implicit_gemm.cu — the groups == 1 convolution's entry points (conv.h): argument
// checks shared by both kernel families, the choice between the sm_90a (wgmma) and the sm_80
// (mma.sync) kernels, the weight gradient's split over pixels and the fixed-order reduction
// of its float32 partials.
//
// wgrad's split over pixels. The (K, R*S*C) output is often a handful of tiles while the depth
// N*P*Q is huge, so the pixel range is cut in `splits` parts (grid y), chosen from the
// geometry alone (wgrad_split) so that tiles * splits is about 2 waves of two CTAs per SM on
// 108-132 SMs, and so that each split keeps at least kWgradMinPixels pixels. Each CTA writes
// its float32 partial tile to workspace[split] with plain stores (no atomics, no zeroing);
// then wgrad_reduce_kernel sums the splits in order 0, 1, ... per element and casts to the
// weight's type: the result is bitwise the same for the same inputs and the same path.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/check.cuh"
#include "../common/vec.cuh"
#include "../matmul/epilogue.cuh"
#include "../matmul/gemm.h"
#include "conv.h"
#include "conv_gather.cuh"
#include "conv_implicit_gemm.h"

namespace fusedops {
namespace {

using conv_gemm::ConvKernelParams;
using conv_gemm::ConvOp;
using conv_gemm::kSplitPixelAlign;

constexpr int kTile = 128;  // both paths' output tile is 128 x 128
// wgrad's split: the CTA count aimed at (2 waves of 2 CTAs on 128 SMs) and the fewest pixels
// a split keeps, so the partials' traffic stays small next to the gathers.
constexpr int64_t kWgradTargetCtas = 2 * 2 * 128;
constexpr int64_t kWgradMinPixels = 8 * kSplitPixelAlign;
constexpr int kReduceThreads = 256;

// grad_weight[e] = sum over splits (in order) of workspace[split][e], cast to T; 8 elements per
// thread and step (count % 8 == 0: R*S*C is a multiple of 8), grid-stride.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    wgrad_reduce_kernel(const float* __restrict__ workspace, int splits, int64_t count,
                        T* __restrict__ grad_weight) {
  const int64_t runs = count / kEpilogueRun;
  for (int64_t run = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x;
       run < runs; run += static_cast<int64_t>(gridDim.x) * kReduceThreads) {
    const float* src = workspace + run * kEpilogueRun;
    float sum[kEpilogueRun];
#pragma unroll
    for (int e = 0; e < kEpilogueRun; ++e) sum[e] = 0.0f;
#pragma unroll 1
    for (int split = 0; split < splits; ++split) {
      const float4 lo = *reinterpret_cast<const float4*>(src);
      const float4 hi = *reinterpret_cast<const float4*>(src + 4);
      sum[0] += lo.x; sum[1] += lo.y; sum[2] += lo.z; sum[3] += lo.w;
      sum[4] += hi.x; sum[5] += hi.y; sum[6] += hi.z; sum[7] += hi.w;
      src += count;
    }
    constexpr int kPerVec = Vec<T>::kSize;  // 8, or 4 for float32: one or two stores
#pragma unroll
    for (int v = 0; v < kEpilogueRun / kPerVec; ++v) {
      Vec<T> out;
#pragma unroll
      for (int e = 0; e < kPerVec; ++e) out.v[e] = from_float<T>(sum[v * kPerVec + e]);
      store_vec(grad_weight + run * kEpilogueRun + v * kPerVec, out);
    }
  }
}

// ---- Arguments ----

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Every size the kernels hold in an int fits: pixel counts (N*P*Q, N*H*W), the GEMM depths,
// and the input coordinates oh*sh - ph + r*dh (and h + ph) in [-2**30, 2**30].
bool geometry_ok(const ConvGeometry& g) {
  constexpr int64_t kIntMax = INT32_MAX;
  constexpr int64_t kCoordMax = int64_t{1} << 30;
  if (g.batch < 1 || g.in_h < 1 || g.in_w < 1 || g.in_channels < 8 || g.out_channels < 8 ||
      g.kernel_h < 1 || g.kernel_w < 1 || g.out_h < 1 || g.out_w < 1 || g.stride_h < 1 ||
      g.stride_w < 1 || g.pad_h < 0 || g.pad_w < 0 || g.dilation_h < 1 || g.dilation_w < 1) {
    return false;
  }
  if (g.in_channels % 8 != 0 || g.out_channels % 8 != 0) return false;
  if (g.in_h > kCoordMax || g.in_w > kCoordMax || g.out_h > kCoordMax || g.out_w > kCoordMax ||
      g.in_channels > kIntMax || g.out_channels > kIntMax || g.pad_h > kCoordMax ||
      g.pad_w > kCoordMax) {
    return false;
  }
  // Coordinates: |oh*sh - ph + r*dh|, h + ph, ...
  if (g.out_h * g.stride_h + g.pad_h + g.kernel_h * int64_t{g.dilation_h} + g.in_h > kCoordMax ||
      g.out_w * g.stride_w + g.pad_w + g.kernel_w * int64_t{g.dilation_w} + g.in_w > kCoordMax) {
    return false;
  }
  const int64_t taps = int64_t{g.kernel_h} * g.kernel_w;
  if (taps > kIntMax || taps * g.in_channels > kIntMax - kSplitPixelAlign ||
      taps * g.out_channels > kIntMax - kSplitPixelAlign) {
    return false;
  }
  // Pixel counts (with room for a block's overshoot); N*P*Q < 2**31 also bounds the tiles.
  const int64_t out_pixels = g.out_h * g.out_w;  // <= 2**60
  const int64_t in_pixels = g.in_h * g.in_w;
  if (out_pixels > kIntMax || in_pixels > kIntMax) return false;
  if (g.batch > (kIntMax - 2 * kSplitPixelAlign) / out_pixels ||
      g.batch > (kIntMax - 2 * kSplitPixelAlign) / in_pixels) {
    return false;
  }
  return true;
}

ConvKernelParams kernel_params(const ConvGeometry& g) {
  ConvKernelParams p{};
  p.batch = static_cast<int>(g.batch);
  p.in_h = static_cast<int>(g.in_h);
  p.in_w = static_cast<int>(g.in_w);
  p.in_c = static_cast<int>(g.in_channels);
  p.out_c = static_cast<int>(g.out_channels);
  p.taps_h = g.kernel_h;
  p.taps_w = g.kernel_w;
  p.out_h = static_cast<int>(g.out_h);
  p.out_w = static_cast<int>(g.out_w);
  p.stride_h = g.stride_h;
  p.stride_w = g.stride_w;
  p.pad_h = g.pad_h;
  p.pad_w = g.pad_w;
  p.dil_h = g.dilation_h;
  p.dil_w = g.dilation_w;
  p.rsc = static_cast<int>(int64_t{g.kernel_h} * g.kernel_w * g.in_channels);
  p.pixels = static_cast<int>(g.batch * g.out_h * g.out_w);
  return p;
}

GemmParams plain_epilogue(GemmType type, void* out, int64_t m, int64_t n) {
  GemmParams e{};
  e.m = m;
  e.n = n;
  e.k = 1;
  e.type = type;
  e.activation = Activation::kNone;
  e.out = out;
  e.ld_out = n;
  return e;
}

// wgrad's split, from the geometry alone (conv_wgrad_workspace_floats must agree with the
// launch): enough CTAs for ~2 waves, at least kWgradMinPixels pixels per split, and no empty
// split (the pixels per split are rounded up to kSplitPixelAlign, then the count recomputed).
struct WgradSplit {
  int splits;
  int split_pixels;
};
WgradSplit wgrad_split(const ConvGeometry& g) {
  const int64_t rsc = int64_t{g.kernel_h} * g.kernel_w * g.in_channels;
  const int64_t tiles = ((g.out_channels + kTile - 1) / kTile) * ((rsc + kTile - 1) / kTile);
  const int64_t pixels = g.batch * g.out_h * g.out_w;
  int64_t splits = (kWgradTargetCtas + tiles - 1) / tiles;
  const int64_t most = (pixels + kWgradMinPixels - 1) / kWgradMinPixels;
  splits = splits < most ? splits : most;
  splits = splits < 1 ? 1 : splits;
  int64_t per_split = (pixels + splits - 1) / splits;
  per_split = (per_split + kSplitPixelAlign - 1) / kSplitPixelAlign * kSplitPixelAlign;
  splits = (pixels + per_split - 1) / per_split;
  return {static_cast<int>(splits), static_cast<int>(per_split)};
}

template <typename T>
cudaError_t launch_reduce(const float* workspace, int splits, int64_t count, void* grad_weight,
                          cudaStream_t stream) {
  const int64_t runs = count / kEpilogueRun;
  int64_t blocks = (runs + kReduceThreads - 1) / kReduceThreads;
  blocks = blocks < 65535 ? blocks : 65535;  // grid-stride beyond
  auto kernel = wgrad_reduce_kernel<T>;
  auto* out = static_cast<T*>(grad_weight);
  const dim3 grid(static_cast<unsigned>(blocks));
  kernel<<<grid, kReduceThreads, 0, stream>>>(workspace, splits, count, out);
  return cudaGetLastError();
}

using ReduceLauncher = cudaError_t (*)(const float*, int, int64_t, void*, cudaStream_t);
constexpr ReduceLauncher kReduceLaunchers[3] = {launch_reduce<__half>,
                                                launch_reduce<__nv_bfloat16>,
                                                launch_reduce<float>};
static_assert(static_cast<int>(GemmType::kFloat16) == 0 &&
                  static_cast<int>(GemmType::kBFloat16) == 1 &&
                  static_cast<int>(GemmType::kFloat32) == 2,
              "the launcher tables are indexed by GemmType");

// float32 is multiplied in tf32 (conv.h): the caller has checked that it may be.
bool type_ok(GemmType type) {
  return type == GemmType::kFloat16 || type == GemmType::kBFloat16 ||
         type == GemmType::kFloat32;
}

// Runs `op` on the asked path: kAuto takes sm_90a where this build and the device have it and
// it covers (op, type), else sm_80; kSm90 refuses (cudaErrorNotSupported) where it cannot.
cudaError_t run(ConvOp op, GemmType type, const ConvKernelParams& params, int splits,
                GemmPath path, cudaStream_t stream, GemmPath* ran) {
  int device = 0;
  FUSEDOPS_RETURN_IF_ERROR(cudaGetDevice(&device));
  const bool sm90 = conv_gemm::conv_sm90_runs(device) && conv_gemm::conv_sm90_covers(op, type);
  if (path == GemmPath::kSm90 && !sm90) return cudaErrorNotSupported;
  const GemmPath chosen = (path == GemmPath::kSm80 || !sm90) ? GemmPath::kSm80 : GemmPath::kSm90;
  if (ran != nullptr) *ran = chosen;
  return chosen == GemmPath::kSm90 ? conv_gemm::conv_sm90_launch(op, type, params, splits, stream)
                                   : conv_gemm::conv_sm80_launch(op, type, params, splits, stream);
}

}  // namespace

bool conv_implicit_gemm_sm90_available(int device) { return conv_gemm::conv_sm90_runs(device); }

int64_t conv_wgrad_workspace_floats(const ConvGeometry& geometry) {
  if (!geometry_ok(geometry)) return 0;
  const int64_t rsc = int64_t{geometry.kernel_h} * geometry.kernel_w * geometry.in_channels;
  return int64_t{wgrad_split(geometry).splits} * geometry.out_channels * rsc;
}

cudaError_t conv_fwd(const ConvFwdParams& params, GemmPath path, cudaStream_t stream,
                     GemmPath* ran) {
  const ConvGeometry& g = params.geometry;
  if (!geometry_ok(g) || !type_ok(params.type)) return cudaErrorInvalidValue;
  if (params.input == nullptr || params.weight == nullptr || params.out == nullptr ||
      !aligned16(params.input) || !aligned16(params.weight)) {
    return cudaErrorInvalidValue;
  }
  if (static_cast<int>(params.activation) < static_cast<int>(Activation::kNone) ||
      static_cast<int>(params.activation) > static_cast<int>(Activation::kSilu)) {
    return cudaErrorInvalidValue;
  }
  ConvKernelParams p = kernel_params(g);
  p.m = p.pixels;
  p.n = g.out_channels;
  p.depth = p.rsc;
  p.act = params.input;
  p.other = params.weight;
  p.epi = plain_epilogue(params.type, params.out, p.m, p.n);
  p.epi.k = p.depth;
  p.epi.bias = params.bias;
  p.epi.residual = params.residual;
  p.epi.ld_residual = g.out_channels;
  p.epi.activation = params.activation;
  p.epi.preact = params.preact;
  p.epi.ld_preact = g.out_channels;
  return run(ConvOp::kFwd, params.type, p, 1, path, stream, ran);
}

cudaError_t conv_dgrad(const ConvDgradParams& params, GemmPath path, cudaStream_t stream,
                       GemmPath* ran) {
  const ConvGeometry& g = params.geometry;
  if (!geometry_ok(g) || !type_ok(params.type)) return cudaErrorInvalidValue;
  if (params.dz == nullptr || params.weight == nullptr || params.grad_input == nullptr ||
      !aligned16(params.dz) || !aligned16(params.weight) || !aligned16(params.grad_input)) {
    return cudaErrorInvalidValue;
  }
  // One GEMM per stride phase (conv_gather.cuh's top comment): m and depth are the phase's;
  // stride 1 is one phase, the whole (N*H*W, R*S*K) GEMM.
  ConvKernelParams p = kernel_params(g);
  p.n = g.in_channels;
  p.act = params.dz;
  p.other = params.weight;
  const int64_t element_bytes = params.type == GemmType::kFloat32 ? 4 : 2;
  const int64_t grad_input_bytes =
      g.batch * g.in_h * g.in_w * g.in_channels * element_bytes;
  return conv_gemm::dgrad_for_each_phase(
      p,
      [&] { return cudaMemsetAsync(params.grad_input, 0, grad_input_bytes, stream); },
      [&](ConvKernelParams phase) {
        phase.epi = plain_epilogue(params.type, params.grad_input, phase.m, phase.n);
        phase.epi.k = phase.depth;
        return run(ConvOp::kDgrad, params.type, phase, 1, path, stream, ran);
      });
}

cudaError_t conv_wgrad(const ConvWgradParams& params, GemmPath path, cudaStream_t stream,
                       GemmPath* ran) {
  const ConvGeometry& g = params.geometry;
  if (!geometry_ok(g) || !type_ok(params.type)) return cudaErrorInvalidValue;
  if (params.dz == nullptr || params.input == nullptr || params.grad_weight == nullptr ||
      params.workspace == nullptr || !aligned16(params.dz) || !aligned16(params.input) ||
      !aligned16(params.grad_weight) || !aligned16(params.workspace)) {
    return cudaErrorInvalidValue;
  }
  const WgradSplit split = wgrad_split(g);
  if (split.splits > 65535) return cudaErrorInvalidValue;  // grid y (never with the target)
  ConvKernelParams p = kernel_params(g);
  p.m = g.out_channels;
  p.n = p.rsc;
  p.depth = p.pixels;
  p.split_pixels = split.split_pixels;
  p.split_floats = p.m * p.n;
  p.act = params.input;
  p.other = params.dz;
  p.epi = plain_epilogue(GemmType::kFloat32, params.workspace, p.m, p.n);
  p.epi.k = p.pixels;
  FUSEDOPS_RETURN_IF_ERROR(run(ConvOp::kWgrad, params.type, p, split.splits, path, stream, ran));
  return kReduceLaunchers[static_cast<int>(params.type)](params.workspace, split.splits,
                                                         p.split_floats, params.grad_weight,
                                                         stream);
}

}  // namespace fusedops
