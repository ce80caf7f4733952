// conv_depthwise.cu — depthwise convolution (groups == C, channel multiplier M = K / C),
// forward with the fused epilogue and backward (grad_input, grad_weight), NHWC, direct.
//
// The math (conv.h, triton_kernels/conv_depthwise.py): output channel k reads input channel
// c = k / M through its own R x S filter w[k, r, s]:
//
//   z[n, oh, ow, k] = sum_{r, s} x[n, oh*sh - ph + r*dh, ow*sw - pw + s*dw, k / M] * w[k, r, s]
//                     + bias[k] + residual[n, oh, ow, k]        (pixels outside x read 0)
//   out = act(z); preact = z (rounded to T) when asked for.
//
//   grad_input[n, h, w, c] = sum_{m < M} sum_{r, s} dz[n, oh, ow, c*M + m] * w[c*M + m, r, s]
//       over the taps with oh = (h + ph - r*dh) / sh exact (remainder 0) and 0 <= oh < P,
//       likewise ow; dz = grad_out * act'(z) is formed by the caller.
//   grad_weight[k, r, s] = sum_{n, oh, ow} dz[n, oh, ow, k] * x[n, ih, iw, k / M]   (float32)
//
// Why direct and not an implicit GEMM: there is no reduction over channels, so nothing for
// tensor cores; a 3x3 layer does ~2*9 FLOPs per element moved and is bound by memory
// bandwidth. The goal is every byte from DRAM once, in 16-byte accesses, and few
// instructions per element. The partitioning follows the Triton tier: channels are the
// vector dimension (contiguous in NHWC), pixels the parallel one.
//
// Forward (dw_fwd_kernel). One thread per (output pixel, run of 8 consecutive output
// channels): the linear thread index is pixel * runs + run, so a warp covers 32 runs of one
// or a few neighbouring pixels: its loads of x (per tap) and its stores are contiguous
// stretches of channels, coalesced. Per tap (r, s) the thread reads the 8 input channels its
// output channels need: for M == 1 the same 8 channels, one 16-byte load (two for float32);
// for M > 1 a per-element gather of x[..., (k0 + e) / M] (the neighbouring threads read the
// same few channels, so the sectors are shared in L1). Rows run in a loop and so do the
// columns (R, S are runtime values: one instantiation per type), so registers stay low
// (no spills) and occupancy high; latency is covered by many resident threads rather than
// unrolled taps. The weights (K, R, S) are read with plain scalar loads, w[k, tap] for the
// 8 channels of the run: K*R*S elements, a few KB to a few hundred KB, that every pixel
// re-reads — they live in L1/L2 and cost no DRAM traffic. (Staging them in shared memory
// would need a block to own a fixed channel range, i.e. a 2-D block/grid, and a per-tap
// layout change; with the thread mapping above a block's channels wrap around K, so the
// simple cached reads are what we use. Not yet measured on a GPU.)
// The epilogue runs in registers: + bias[k] (float32, scalar loads, L1-resident), +
// residual (16-byte loads), store preact = z rounded to T, store out = act(z).
//
// grad_input (dw_dgrad_kernel). A gather, never a scatter, so no atomics: one thread per
// (input pixel, run of 8 input channels). For each tap it finds the one output pixel that
// reaches it, if any (oh = (h + ph - r*dh) / sh must divide exactly and land in [0, P);
// as r grows the numerator shrinks, so a negative one ends the row loop), then sums
// dz * w over the M output channels of each input channel: for M == 1 dz is one 16-byte
// run load, for M > 1 per-element loads of dz[..., c*M + m] (the M*8 channels of a run
// are contiguous, so the warp's loads still cover whole sectors).
//
// grad_weight (dw_wgrad_partial_kernel + dw_wgrad_reduce_kernel). A reduction over the
// N*P*Q output pixels, split into `slices` contiguous pixel ranges. One thread per
// (slice, tap, run of 8 output channels), linear index ((slice * taps + tap) * runs + run):
// the threads of a warp share slice and tap and walk the same pixels in step, so their dz
// and x loads are contiguous runs of channels (16-byte, coalesced). Each keeps 8 float32
// sums over its slice and writes them to workspace[slice][tap][k] (every element written,
// zeros for empty slices: nothing needs clearing). The R*S threads of the different taps
// read the same dz rows again, from L2. Then dw_wgrad_reduce_kernel, one thread per (tap, k),
// sums the slices in order 0, 1, ... and writes grad_weight[k, r, s] (float32, overwritten).
// No atomics anywhere: bitwise deterministic for a given geometry. The slice count is a
// function of the geometry only (wgrad_slices), so depthwise_bwd_workspace_floats needs no
// device query: enough slices for ~2**18 threads, but at least kMinPixelsPerSlice pixels each
// and at most kMaxSlices slices.
//
// Vector paths: a thread uses 16-byte accesses for a tensor only when the tensor's channel
// count (its channel stride between pixels) is a multiple of Vec<T>::kSize (8 for 16-bit
// types, 4 for float32) and its base is 16-byte aligned; then every run of 8 starting at a
// multiple of 8 is either whole or (float32, K % 8 == 4) exactly one 16-byte vector. The
// decision is per tensor and uniform over the launch (kernel arguments). Otherwise the
// scalar path, element by element, for any C and K. Either way only elements [0, valid) of
// a run are touched, and every x tap is bounds-checked, so nothing outside a tensor is read
// or written.
//
// Arithmetic: float32 accumulation (fmaf) for every T, exact float32 products for float (no
// tf32); conversions by to_float / from_float (round to nearest even).
//
// Indexing: pixel counts (N*H*W, N*P*Q) and K*R*S are int32 (the launchers refuse more,
// as the Triton tier does: a case for the torch tier), and the coordinate arithmetic
// (oh*sh - ph + r*dh, h + ph - r*dh) is checked by the launcher to fit in int32; every memory
// offset is formed in int64, so tensors of more than 2**31 elements are fine. Grids are
// 1-D (x), capped at kMaxBlocks blocks with a grid-stride loop.

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/check.cuh"
#include "../common/dtype.cuh"
#include "../common/vec.cuh"
#include "../matmul/activation.cuh"
#include "../matmul/epilogue.cuh"  // Run, load_run, kEpilogueRun
#include "conv.h"

namespace fusedops {
namespace {

// Tune numbers, chosen on paper (not yet measured: no fusedops kernel has run on a GPU).
constexpr int kRunLen = kEpilogueRun;  // channels per thread: 16 bytes of a 16-bit type
constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // grid-stride beyond 2**28 threads
constexpr int64_t kWgradTargetThreads = int64_t{1} << 18;
constexpr int64_t kMinPixelsPerSlice = 32;
constexpr int64_t kMaxSlices = 4096;

// The geometry as int32 (validated by the launchers), plus derived counts.
struct Shape {
  int n, h, w, c, k, r, s, p, q;
  int sh, sw, ph, pw, dh, dw;
  int m;      // K / C
  int taps;   // R * S
  int runs;   // ceil(K / 8): runs of output channels
  int cruns;  // ceil(C / 8): runs of input channels
};

// Elements [0, valid) of the run at p as float32, 0 beyond. vec: p is 16-byte aligned and
// valid is a multiple of Vec<T>::kSize (vectors past `valid` are not loaded).
template <typename T>
__device__ __forceinline__ void load_floats(const T* p, int valid, bool vec,
                                            float (&v)[kRunLen]) {
  if (vec) {
    Run<T> run;
#pragma unroll
    for (int i = 0; i < Run<T>::kVectors; ++i) {
      if (i * Vec<T>::kSize < valid) {
        run.vec[i] = load_vec(p + i * Vec<T>::kSize);
      } else {
#pragma unroll
        for (int j = 0; j < Vec<T>::kSize; ++j) run.vec[i].v[j] = from_float<T>(0.f);
      }
    }
#pragma unroll
    for (int e = 0; e < kRunLen; ++e) v[e] = to_float(run[e]);
  } else {
#pragma unroll
    for (int e = 0; e < kRunLen; ++e) v[e] = e < valid ? to_float(p[e]) : 0.f;
  }
}

// Stores elements [0, valid) of v, rounded to T, at p (same conditions on vec).
template <typename T>
__device__ __forceinline__ void store_floats(T* p, int valid, bool vec,
                                             const float (&v)[kRunLen]) {
  if (vec) {
    Run<T> run;
#pragma unroll
    for (int e = 0; e < kRunLen; ++e) run[e] = from_float<T>(v[e]);
#pragma unroll
    for (int i = 0; i < Run<T>::kVectors; ++i) {
      if (i * Vec<T>::kSize < valid) store_vec(p + i * Vec<T>::kSize, run.vec[i]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < kRunLen; ++e) {
      if (e < valid) p[e] = from_float<T>(v[e]);
    }
  }
}

// For M > 1: output channels k0 .. k0+7 read input channels c_lo = k0 / M, ... where the
// channel steps up by one at each element e > 0 with (k0 + e) % M == 0; bit e of the result
// marks those steps (2 registers instead of 8 channel indices live across the tap loops).
__device__ __forceinline__ unsigned channel_steps(int k0, int m) {
  unsigned steps = 0;
  for (int e = m - k0 % m; e < kRunLen; e += m) steps |= 1u << e;
  return steps;
}

// xv[e] = x[c(e)] for e < valid, 0 beyond, with c(e) from c_lo and channel_steps.
template <typename T>
__device__ __forceinline__ void gather_floats(const T* xp, int c_lo, unsigned steps, int valid,
                                              float (&xv)[kRunLen]) {
  int c = c_lo;
#pragma unroll
  for (int e = 0; e < kRunLen; ++e) {
    c += (steps >> e) & 1u;
    xv[e] = e < valid ? to_float(xp[c]) : 0.f;
  }
}

__device__ __forceinline__ int64_t thread_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t thread_stride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// ---- forward -------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dw_fwd_kernel(const DepthwiseFwdParams p, const Shape g, const bool vec_x,
                  const bool vec_out) {
  const T* __restrict__ x = static_cast<const T*>(p.input);
  const T* __restrict__ w = static_cast<const T*>(p.weight);
  const T* residual = static_cast<const T*>(p.residual);
  T* out = static_cast<T*>(p.out);
  T* preact = static_cast<T*>(p.preact);
  const int64_t total = static_cast<int64_t>(g.n) * g.p * g.q * g.runs;

  for (int64_t t = thread_index(); t < total; t += thread_stride()) {
    const int pixel = static_cast<int>(t / g.runs);
    const int k0 = static_cast<int>(t - static_cast<int64_t>(pixel) * g.runs) * kRunLen;
    const int valid = min(kRunLen, g.k - k0);
    const int ow = pixel % g.q;
    const int rest = pixel / g.q;
    const int oh = rest % g.p;
    const int n = rest / g.p;
    const int c_lo = k0 / g.m;
    const unsigned steps = channel_steps(k0, g.m);

    float acc[kRunLen];
#pragma unroll
    for (int e = 0; e < kRunLen; ++e) acc[e] = 0.f;
    const T* wk = w + static_cast<int64_t>(k0) * g.taps;  // w[k0, 0, 0]
    const int top = oh * g.sh - g.ph;
    const int left = ow * g.sw - g.pw;

#pragma unroll 1
    for (int r = 0; r < g.r; ++r) {
      const int ih = top + r * g.dh;
      if (ih < 0 || ih >= g.h) continue;
      const int64_t x_row = static_cast<int64_t>(n * g.h + ih) * g.w;
#pragma unroll 1
      for (int s = 0; s < g.s; ++s) {
        const int iw = left + s * g.dw;
        if (iw < 0 || iw >= g.w) continue;
        const T* xp = x + (x_row + iw) * g.c;
        float xv[kRunLen];
        if (g.m == 1) {
          load_floats(xp + k0, valid, vec_x, xv);
        } else {
          gather_floats(xp, c_lo, steps, valid, xv);
        }
        const int tap = r * g.s + s;
#pragma unroll
        for (int e = 0; e < kRunLen; ++e) {
          if (e < valid) {
            acc[e] = fmaf(xv[e], to_float(wk[static_cast<int64_t>(e) * g.taps + tap]), acc[e]);
          }
        }
      }
    }

    // Epilogue: z = conv + bias + residual; preact = z; out = act(z).
    const int64_t o = static_cast<int64_t>(pixel) * g.k + k0;
    if (p.bias != nullptr) {
#pragma unroll
      for (int e = 0; e < kRunLen; ++e) {
        if (e < valid) acc[e] += p.bias[k0 + e];
      }
    }
    if (residual != nullptr) {
      float rv[kRunLen];
      load_floats(residual + o, valid, vec_out, rv);
#pragma unroll
      for (int e = 0; e < kRunLen; ++e) acc[e] += rv[e];
    }
    if (preact != nullptr) store_floats(preact + o, valid, vec_out, acc);
    float y[kRunLen];
#pragma unroll
    for (int e = 0; e < kRunLen; ++e) y[e] = activate(acc[e], p.activation);
    store_floats(out + o, valid, vec_out, y);
  }
}

// ---- backward: grad_input ------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dw_dgrad_kernel(const DepthwiseBwdParams p, const Shape g, const bool vec_dz,
                    const bool vec_dx) {
  const T* __restrict__ dz = static_cast<const T*>(p.dz);
  const T* __restrict__ w = static_cast<const T*>(p.weight);
  T* dx = static_cast<T*>(p.grad_input);
  const int64_t total = static_cast<int64_t>(g.n) * g.h * g.w * g.cruns;

  for (int64_t t = thread_index(); t < total; t += thread_stride()) {
    const int pixel = static_cast<int>(t / g.cruns);
    const int c0 = static_cast<int>(t - static_cast<int64_t>(pixel) * g.cruns) * kRunLen;
    const int valid = min(kRunLen, g.c - c0);
    const int iw = pixel % g.w;
    const int rest = pixel / g.w;
    const int ih = rest % g.h;
    const int n = rest / g.h;

    float acc[kRunLen];
#pragma unroll
    for (int e = 0; e < kRunLen; ++e) acc[e] = 0.f;

#pragma unroll 1
    for (int r = 0; r < g.r; ++r) {
      const int num_h = ih + g.ph - r * g.dh;  // oh * sh for a tap that reaches this pixel
      if (num_h < 0) break;                    // decreases with r
      if (num_h % g.sh != 0) continue;
      const int oh = num_h / g.sh;
      if (oh >= g.p) continue;
      const int64_t dz_row = static_cast<int64_t>(n * g.p + oh) * g.q;
#pragma unroll 1
      for (int s = 0; s < g.s; ++s) {
        const int num_w = iw + g.pw - s * g.dw;
        if (num_w < 0) break;
        if (num_w % g.sw != 0) continue;
        const int ow = num_w / g.sw;
        if (ow >= g.q) continue;
        const T* dzp = dz + (dz_row + ow) * g.k;
        const int tap = r * g.s + s;
        if (g.m == 1) {  // k == c
          float dv[kRunLen];
          load_floats(dzp + c0, valid, vec_dz, dv);
#pragma unroll
          for (int e = 0; e < kRunLen; ++e) {
            if (e < valid) {
              const int64_t wi = static_cast<int64_t>(c0 + e) * g.taps + tap;
              acc[e] = fmaf(dv[e], to_float(w[wi]), acc[e]);
            }
          }
        } else {
#pragma unroll 1
          for (int m = 0; m < g.m; ++m) {
#pragma unroll
            for (int e = 0; e < kRunLen; ++e) {
              if (e < valid) {
                const int k = (c0 + e) * g.m + m;
                acc[e] = fmaf(to_float(dzp[k]),
                              to_float(w[static_cast<int64_t>(k) * g.taps + tap]), acc[e]);
              }
            }
          }
        }
      }
    }
    store_floats(dx + static_cast<int64_t>(pixel) * g.c + c0, valid, vec_dx, acc);
  }
}

// ---- backward: grad_weight -----------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dw_wgrad_partial_kernel(const DepthwiseBwdParams p, const Shape g, const int slices,
                            const int pixels_per_slice, const bool vec_dz, const bool vec_x) {
  const T* __restrict__ dz = static_cast<const T*>(p.dz);
  const T* __restrict__ x = static_cast<const T*>(p.input);
  const int pixels = g.n * g.p * g.q;
  const int64_t total = static_cast<int64_t>(slices) * g.taps * g.runs;

  for (int64_t t = thread_index(); t < total; t += thread_stride()) {
    const int64_t slice_tap = t / g.runs;
    const int k0 = static_cast<int>(t - slice_tap * g.runs) * kRunLen;
    const int slice = static_cast<int>(slice_tap / g.taps);
    const int tap = static_cast<int>(slice_tap - static_cast<int64_t>(slice) * g.taps);
    const int valid = min(kRunLen, g.k - k0);
    const int r = tap / g.s;
    const int s = tap - r * g.s;
    const int c_lo = k0 / g.m;
    const unsigned steps = channel_steps(k0, g.m);

    float acc[kRunLen];
#pragma unroll
    for (int e = 0; e < kRunLen; ++e) acc[e] = 0.f;

    const int64_t begin64 = static_cast<int64_t>(slice) * pixels_per_slice;
    const int begin = static_cast<int>(begin64 < pixels ? begin64 : pixels);
    const int end = static_cast<int>(min(begin64 + pixels_per_slice, static_cast<int64_t>(pixels)));
    if (begin < end) {
      int ow = begin % g.q;
      const int rest = begin / g.q;
      int oh = rest % g.p;
      int n = rest / g.p;
      const int dh_off = r * g.dh - g.ph;
      const int dw_off = s * g.dw - g.pw;
#pragma unroll 1
      for (int pixel = begin; pixel < end; ++pixel) {
        const int ih = oh * g.sh + dh_off;
        const int iw = ow * g.sw + dw_off;
        if (ih >= 0 && ih < g.h && iw >= 0 && iw < g.w) {
          float dv[kRunLen], xv[kRunLen];
          load_floats(dz + static_cast<int64_t>(pixel) * g.k + k0, valid, vec_dz, dv);
          const T* xp = x + (static_cast<int64_t>(n * g.h + ih) * g.w + iw) * g.c;
          if (g.m == 1) {
            load_floats(xp + k0, valid, vec_x, xv);
          } else {
            gather_floats(xp, c_lo, steps, valid, xv);
          }
#pragma unroll
          for (int e = 0; e < kRunLen; ++e) acc[e] = fmaf(dv[e], xv[e], acc[e]);
        }
        if (++ow == g.q) {
          ow = 0;
          if (++oh == g.p) {
            oh = 0;
            ++n;
          }
        }
      }
    }
    // workspace[slice][tap][k]: written whole, zeros for an empty slice.
    float* ws = p.workspace + (static_cast<int64_t>(slice) * g.taps + tap) * g.k + k0;
#pragma unroll
    for (int e = 0; e < kRunLen; ++e) {
      if (e < valid) ws[e] = acc[e];
    }
  }
}

// grad_weight[k, tap] = sum over slices, in order, of workspace[slice][tap][k].
__global__ void __launch_bounds__(kThreads)
    dw_wgrad_reduce_kernel(const float* __restrict__ workspace, float* __restrict__ grad_weight,
                           const int slices, const int k, const int taps) {
  const int64_t total = static_cast<int64_t>(k) * taps;
  for (int64_t j = thread_index(); j < total; j += thread_stride()) {
    const int tap = static_cast<int>(j / k);
    const int kk = static_cast<int>(j - static_cast<int64_t>(tap) * k);
    float sum = 0.f;
#pragma unroll 4
    for (int slice = 0; slice < slices; ++slice) sum += workspace[slice * total + j];
    grad_weight[static_cast<int64_t>(kk) * taps + tap] = sum;
  }
}

// ---- host side -----------------------------------------------------------------------------

int vec_size(GemmType type) { return type == GemmType::kFloat32 ? 4 : 8; }

bool aligned16(const void* ptr) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % kVecBytes == 0;
}

// Validates the geometry (see "Indexing" above) and fills the int32 shape.
bool make_shape(const ConvGeometry& geo, Shape* shape) {
  const ConvGeometry& g = geo;
  if (g.batch < 0 || g.in_h < 0 || g.in_w < 0 || g.in_channels < 0 || g.out_channels < 0 ||
      g.out_h < 0 || g.out_w < 0) {
    return false;
  }
  if (g.kernel_h < 1 || g.kernel_w < 1 || g.stride_h < 1 || g.stride_w < 1 ||
      g.dilation_h < 1 || g.dilation_w < 1 || g.pad_h < 0 || g.pad_w < 0) {
    return false;
  }
  if (g.in_channels == 0 ? g.out_channels != 0 : g.out_channels % g.in_channels != 0) {
    return false;
  }
  // Products stay below 2**31; the bounds on each factor come first so nothing overflows.
  constexpr int64_t kMax = INT32_MAX;
  if (g.batch > kMax || g.in_h > kMax || g.in_w > kMax || g.out_h > kMax || g.out_w > kMax ||
      g.out_channels > kMax) {
    return false;
  }
  const auto product_ok = [](int64_t a, int64_t b, int64_t c) {
    if (a == 0 || b == 0 || c == 0) return true;
    return a <= kMax / b && a * b <= kMax / c;
  };
  if (!product_ok(g.batch, g.in_h, g.in_w) || !product_ok(g.batch, g.out_h, g.out_w) ||
      !product_ok(g.out_channels, g.kernel_h, g.kernel_w)) {
    return false;
  }
  // Coordinates: oh*sh - ph + r*dh and h + ph - r*dh (and the column ones) fit in int32.
  const auto coords_ok = [](int64_t in, int64_t out, int64_t stride, int64_t pad, int64_t kernel,
                            int64_t dilation) {
    return out * stride + kernel * dilation + pad + in < kMax;
  };
  if (!coords_ok(g.in_h, g.out_h, g.stride_h, g.pad_h, g.kernel_h, g.dilation_h) ||
      !coords_ok(g.in_w, g.out_w, g.stride_w, g.pad_w, g.kernel_w, g.dilation_w)) {
    return false;
  }
  Shape s;
  s.n = static_cast<int>(g.batch);
  s.h = static_cast<int>(g.in_h);
  s.w = static_cast<int>(g.in_w);
  s.c = static_cast<int>(g.in_channels);
  s.k = static_cast<int>(g.out_channels);
  s.r = g.kernel_h;
  s.s = g.kernel_w;
  s.p = static_cast<int>(g.out_h);
  s.q = static_cast<int>(g.out_w);
  s.sh = g.stride_h;
  s.sw = g.stride_w;
  s.ph = g.pad_h;
  s.pw = g.pad_w;
  s.dh = g.dilation_h;
  s.dw = g.dilation_w;
  s.m = s.c > 0 ? s.k / s.c : 1;
  s.taps = s.r * s.s;
  s.runs = (s.k + kRunLen - 1) / kRunLen;
  s.cruns = (s.c + kRunLen - 1) / kRunLen;
  *shape = s;
  return true;
}

// The number of pixel slices of the weight-gradient reduction: a function of the geometry
// only (the workspace size must not depend on the device).
int64_t wgrad_slices(const Shape& g) {
  const int64_t pixels = static_cast<int64_t>(g.n) * g.p * g.q;
  const int64_t per_slice_threads = static_cast<int64_t>(g.taps) * (g.runs > 0 ? g.runs : 1);
  int64_t slices = kWgradTargetThreads / per_slice_threads;
  const int64_t by_pixels = (pixels + kMinPixelsPerSlice - 1) / kMinPixelsPerSlice;
  if (slices > by_pixels) slices = by_pixels;
  if (slices > kMaxSlices) slices = kMaxSlices;
  return slices < 1 ? 1 : slices;
}

unsigned blocks_for(int64_t threads) {
  int64_t blocks = (threads + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  return static_cast<unsigned>(blocks);
}

template <typename T>
cudaError_t launch_fwd(const DepthwiseFwdParams& p, const Shape& g, cudaStream_t stream) {
  const int vs = vec_size(p.type);
  const bool vec_x = g.m == 1 && g.c % vs == 0 && aligned16(p.input);
  const bool vec_out = g.k % vs == 0 && aligned16(p.out) && aligned16(p.residual) &&
                       aligned16(p.preact);
  const int64_t threads = static_cast<int64_t>(g.n) * g.p * g.q * g.runs;
  if (threads == 0) return cudaSuccess;
  dw_fwd_kernel<T><<<blocks_for(threads), kThreads, 0, stream>>>(p, g, vec_x, vec_out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const DepthwiseBwdParams& p, const Shape& g, cudaStream_t stream) {
  const int vs = vec_size(p.type);
  const bool vec_dz = g.k % vs == 0 && aligned16(p.dz);
  if (p.grad_weight != nullptr && g.k > 0) {
    const int64_t slices = wgrad_slices(g);
    const int64_t pixels = static_cast<int64_t>(g.n) * g.p * g.q;
    const int64_t per_slice = (pixels + slices - 1) / slices;
    const bool vec_x = g.m == 1 && g.c % vs == 0 && aligned16(p.input);
    dw_wgrad_partial_kernel<T>
        <<<blocks_for(slices * g.taps * g.runs), kThreads, 0, stream>>>(
            p, g, static_cast<int>(slices), static_cast<int>(per_slice), vec_dz, vec_x);
    FUSEDOPS_RETURN_IF_ERROR(cudaGetLastError());
    dw_wgrad_reduce_kernel<<<blocks_for(static_cast<int64_t>(g.k) * g.taps), kThreads, 0,
                             stream>>>(p.workspace, p.grad_weight, static_cast<int>(slices),
                                       g.k, g.taps);
    FUSEDOPS_RETURN_IF_ERROR(cudaGetLastError());
  }
  const int64_t in_threads = static_cast<int64_t>(g.n) * g.h * g.w * g.cruns;
  if (p.grad_input != nullptr && in_threads > 0) {
    const bool vec_dx = g.c % vs == 0 && aligned16(p.grad_input);
    dw_dgrad_kernel<T><<<blocks_for(in_threads), kThreads, 0, stream>>>(p, g, vec_dz && g.m == 1,
                                                                         vec_dx);
    FUSEDOPS_RETURN_IF_ERROR(cudaGetLastError());
  }
  return cudaSuccess;
}

// The instantiations, all in one place: one per storage type for each launcher (R, S, M and
// the activation are runtime values).
template <typename Params>
cudaError_t dispatch(const Params& p, const Shape& g, cudaStream_t stream);

template <>
cudaError_t dispatch(const DepthwiseFwdParams& p, const Shape& g, cudaStream_t stream) {
  switch (p.type) {
    case GemmType::kFloat16: return launch_fwd<__half>(p, g, stream);
    case GemmType::kBFloat16: return launch_fwd<__nv_bfloat16>(p, g, stream);
    case GemmType::kFloat32: return launch_fwd<float>(p, g, stream);
  }
  return cudaErrorInvalidValue;
}

template <>
cudaError_t dispatch(const DepthwiseBwdParams& p, const Shape& g, cudaStream_t stream) {
  switch (p.type) {
    case GemmType::kFloat16: return launch_bwd<__half>(p, g, stream);
    case GemmType::kBFloat16: return launch_bwd<__nv_bfloat16>(p, g, stream);
    case GemmType::kFloat32: return launch_bwd<float>(p, g, stream);
  }
  return cudaErrorInvalidValue;
}

bool type_ok(GemmType type) {
  return type == GemmType::kFloat16 || type == GemmType::kBFloat16 ||
         type == GemmType::kFloat32;
}

bool activation_ok(Activation a) {
  return a == Activation::kNone || a == Activation::kRelu || a == Activation::kGelu ||
         a == Activation::kGeluTanh || a == Activation::kSilu;
}

}  // namespace

int64_t depthwise_bwd_workspace_floats(const ConvGeometry& geometry) {
  Shape g;
  if (!make_shape(geometry, &g)) return 0;
  return wgrad_slices(g) * g.k * g.taps;
}

cudaError_t depthwise_fwd(const DepthwiseFwdParams& params, cudaStream_t stream) {
  Shape g;
  if (!make_shape(params.geometry, &g) || !type_ok(params.type) ||
      !activation_ok(params.activation)) {
    return cudaErrorInvalidValue;
  }
  const int64_t out_elements = static_cast<int64_t>(g.n) * g.p * g.q * g.k;
  if (out_elements == 0) return cudaSuccess;
  if (params.out == nullptr || params.weight == nullptr ||
      (params.input == nullptr && static_cast<int64_t>(g.n) * g.h * g.w * g.c > 0)) {
    return cudaErrorInvalidValue;
  }
  return dispatch(params, g, stream);
}

cudaError_t depthwise_bwd(const DepthwiseBwdParams& params, cudaStream_t stream) {
  Shape g;
  if (!make_shape(params.geometry, &g) || !type_ok(params.type)) return cudaErrorInvalidValue;
  const int64_t out_elements = static_cast<int64_t>(g.n) * g.p * g.q * g.k;
  const int64_t in_elements = static_cast<int64_t>(g.n) * g.h * g.w * g.c;
  const bool want_input = params.grad_input != nullptr && in_elements > 0;
  const bool want_weight = params.grad_weight != nullptr && g.k > 0;
  if (!want_input && !want_weight) return cudaSuccess;
  if (out_elements > 0 && params.dz == nullptr) return cudaErrorInvalidValue;
  if (want_input && params.weight == nullptr) return cudaErrorInvalidValue;
  if (want_weight && (params.workspace == nullptr ||
                      (params.input == nullptr && in_elements > 0))) {
    return cudaErrorInvalidValue;
  }
  return dispatch(params, g, stream);
}

}  // namespace fusedops
