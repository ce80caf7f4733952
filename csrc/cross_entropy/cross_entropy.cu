// cross_entropy.cu — softmax cross-entropy with class-index targets, forward and backward.
//
// The math, per row i (classes c = 0..C-1, target t, eps = label_smoothing, w the class
// weights, all ones when absent; see python/fusedops/dispatch/contract.py):
//
//   z_c  = softcap ? softcap * tanh(x_c / softcap) : x_c
//   lse  = log sum_c exp(z_c)
//   loss = w_t ((1 - eps)(lse - z_t) + z_loss lse^2) + eps/C sum_c w_c (lse - z_c)
//        = w_t ((1 - eps)(lse - z_t) + z_loss lse^2) + eps/C (lse sum(w) - sum_c w_c z_c)
//
//   with p_c = exp(z_c - lse) and g = dresult/dloss_i:
//   dloss/dz_c = w_t ((1 - eps)(p_c - [c == t]) + 2 z_loss lse p_c) + eps/C (sum(w) p_c - w_c)
//              = A p_c - B [c == t] - eps/C w_c           (A, B per row, folded with g)
//   dloss/dx_c = dloss/dz_c (1 - tanh(x_c / softcap)^2)    (with softcap)
//
// Ignored rows (t == ignore_index): loss 0, gradient 0 (lse is still computed). A target
// outside [0, C) that is not ignore_index: loss NaN and gradient row NaN, without reading
// logits[t] (no out-of-bounds access; the host never syncs to check).
//
// The design. The op is memory-bound: a (16384, 128256) bf16 logits tensor is 4.2 GB and the
// arithmetic per element is a handful of FLOPs. So each kernel touches every logit exactly
// once, in 16-byte vectors, and never materialises anything of size N x C besides the
// gradient the backward must write:
//
//   forward   reads N*C*sizeof(T), writes 8*N bytes (loss, lse)
//   backward  reads N*C*sizeof(T), writes N*C*sizeof(T) (over the logits in place, or fresh)
//
// The simple version (torch_ref.py) reads the logits three times forward (max, sum of
// exponentials, gather) and keeps a float32 copy; here the forward is one pass with the
// online softmax (Milakov & Gimelshein 2018): each thread keeps a running maximum m and a
// running sum s = sum exp(z - m), rescaling s when m grows, and folds in sum_c w_c z_c for
// label smoothing in the same pass. z_t is one extra scalar load of logits[t] by thread 0,
// issued before the streaming loop (it is in the same row, usually the same L2 lines).
// Partial (m, s) pairs are combined across the block (csrc/common/reduce.cuh). The backward
// needs no reduction at all: given lse, every element's gradient is local.
//
// One thread block per row: a row is contiguous, so a block streams it with fully coalesced
// 16-byte loads, and the per-row reduction is a cheap block reduction with no atomics or
// second pass. The block size follows C (ce_threads_per_block): about 8 vectors per thread,
// between 32 threads (a single warp, in effect warp-per-row, for C of a few hundred: a
// bigger block would sit idle) and 512 (vocabulary-sized rows: each thread keeps kUnroll
// 16-byte loads in flight, 32 KB per block; two or more resident blocks per SM keep the
// memory system busy while another block does its final reduction). Launch bounds
// (512 threads, 2 blocks per SM) cap registers at 64.
//
// Rows need not be 16-byte aligned (a view with a row stride of 1037, say): each row is cut
// into a scalar head, aligned vectors and a scalar tail (split_row in common/vec.cuh). The
// backward's output rows may be aligned differently from its input rows (a fresh contiguous
// gradient of a strided view): it splits on the input and stores vectors only when the
// output row has the same alignment, else element by element.
//
// Accumulation is in float32 for every logits dtype. Exponentials use __expf (ex2.approx:
// about 2 ulp plus the rounding of its scaled argument, far below the float32 test
// tolerance); the final log and tanh are the accurate logf and tanhf. The label-smoothing
// term lse * sum(w) - sum_c w_c z_c cancels when every logit of a row carries the same large
// offset (absolute error about 1e-7 * C * offset); logits of trained models do not.
//
// Indexing: row offsets are int64 (row * row_stride), so N * C > 2**31 works; column indices
// are int (C < 2**31, checked by the launcher).

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/check.cuh"
#include "../common/dtype.cuh"
#include "../common/reduce.cuh"
#include "../common/vec.cuh"
#include "cross_entropy.h"

namespace fusedops {
namespace {

// Tune numbers. Chosen on paper (bytes in flight per SM, registers), not yet measured: no
// fusedops kernel has run on a GPU. Record the measurement that moves them in
// benchmarks/NOTES.md.
constexpr int kMaxThreads = 512;
constexpr int kMinBlocksPerSm = 2;
constexpr int kUnroll = 4;          // 16-byte loads each thread issues before using them
constexpr int kVecsPerThread = 8;   // target work per thread when choosing the block size

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// softcap * tanh(x / softcap), or x when softcap == 0 (a block-uniform branch).
struct Softcap {
  float cap;
  float inv_cap;
  __device__ __forceinline__ float operator()(float x) const {
    return cap != 0.0f ? cap * tanhf(x * inv_cap) : x;
  }
};

template <typename Index>
__device__ __forceinline__ int64_t load_target(const CrossEntropyInputs& in, int64_t row) {
  return static_cast<int64_t>(static_cast<const Index*>(in.target)[row * in.target_stride]);
}

// Per-thread state of the forward's single pass.
struct FwdState {
  MaxSum ms;   // running max and sum of exp(z - max)
  float zsum;  // sum_c w_c z_c (or sum_c z_c), only with label smoothing
};

// Fold K consecutive transformed logits z[0..K), columns col..col+K, into the state. One
// rescale per group (the group's max first), then one exponential per element.
template <int K>
__device__ __forceinline__ void absorb(const float (&z)[K], int col, FwdState& st,
                                       bool smoothing, const float* __restrict__ weight) {
  float group_max = z[0];
#pragma unroll
  for (int k = 1; k < K; ++k) group_max = fmaxf(group_max, z[k]);
  const float m = fmaxf(st.ms.m, group_max);
  float s = st.ms.s * online_rescale(st.ms.m, m);
#pragma unroll
  for (int k = 0; k < K; ++k) s += online_term(z[k], m);
  st.ms = MaxSum{m, s};
  if (smoothing) {
    if (weight != nullptr) {
#pragma unroll
      for (int k = 0; k < K; ++k) st.zsum += __ldg(weight + col + k) * z[k];
    } else {
#pragma unroll
      for (int k = 0; k < K; ++k) st.zsum += z[k];
    }
  }
}

template <typename T>
__device__ __forceinline__ void absorb_vec(const Vec<T>& x, int col, const Softcap& softcap,
                                           FwdState& st, bool smoothing,
                                           const float* __restrict__ weight) {
  constexpr int V = Vec<T>::kSize;
  float z[V];
#pragma unroll
  for (int k = 0; k < V; ++k) z[k] = softcap(to_float(x.v[k]));
  absorb<V>(z, col, st, smoothing, weight);
}

template <typename T>
__device__ __forceinline__ void absorb_scalar(T x, int col, const Softcap& softcap, FwdState& st,
                                              bool smoothing, const float* __restrict__ weight) {
  const float z[1] = {softcap(to_float(x))};
  absorb<1>(z, col, st, smoothing, weight);
}

}  // namespace

// The kernels live in namespace fusedops (not the anonymous namespace) so that profilers and
// tools/check_sass.py see stable names: fusedops::ce_fwd_kernel<T, Index>.
template <typename T, typename Index>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSm)
    ce_fwd_kernel(const CrossEntropyFwdParams p) {
  constexpr int V = Vec<T>::kSize;
  __shared__ float scratch[3 * kMaxWarps];
  const CrossEntropyInputs& in = p.in;
  const int64_t row = blockIdx.x;
  const int n = static_cast<int>(in.classes);
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const T* __restrict__ x = static_cast<const T*>(in.logits) + row * in.logits_row_stride;
  const float* __restrict__ weight = in.weight;
  const Softcap softcap{in.softcap, in.softcap != 0.0f ? 1.0f / in.softcap : 0.0f};
  const bool smoothing = in.label_smoothing != 0.0f;

  const int64_t t = load_target<Index>(in, row);
  const bool ignored = t == in.ignore_index;
  const bool in_range = t >= 0 && t < in.classes;
  float z_t = 0.0f;
  if (tid == 0 && !ignored && in_range) z_t = softcap(to_float(x[t]));

  FwdState st{MaxSum{-INFINITY, 0.0f}, 0.0f};
  const RowSplit split = split_row(x, n);
  if (tid < split.head) absorb_scalar(x[tid], tid, softcap, st, smoothing, weight);
  const T* __restrict__ xv = x + split.head;  // 16-byte aligned
  int v = tid;
  for (; v + (kUnroll - 1) * nthreads < split.num_vecs; v += kUnroll * nthreads) {
    Vec<T> buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) buf[u] = load_vec(xv + (v + u * nthreads) * V);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      absorb_vec(buf[u], split.head + (v + u * nthreads) * V, softcap, st, smoothing, weight);
    }
  }
  for (; v < split.num_vecs; v += nthreads) {
    absorb_vec(load_vec(xv + v * V), split.head + v * V, softcap, st, smoothing, weight);
  }
  const int tail = split.tail_begin + tid;
  if (tail < n) absorb_scalar(x[tail], tail, softcap, st, smoothing, weight);

  block_reduce_max_sum_to_thread0(st.ms, st.zsum, scratch);
  if (tid != 0) return;
  const float lse = st.ms.m + logf(st.ms.s);  // all -inf: -inf + log(0) = -inf
  float loss;
  if (ignored) {
    loss = 0.0f;
  } else if (!in_range) {
    loss = quiet_nan();
  } else {
    const float w_t = weight != nullptr ? weight[t] : 1.0f;
    loss = w_t * ((1.0f - in.label_smoothing) * (lse - z_t) + in.z_loss * lse * lse);
    if (smoothing) {
      const float sum_w = weight != nullptr ? *in.weight_sum : static_cast<float>(n);
      loss += in.label_smoothing / static_cast<float>(n) * (lse * sum_w - st.zsum);
    }
  }
  p.loss[row] = loss;
  p.lse[row] = lse;
}

namespace {

// The row-constant part of the gradient: dloss/dx_c = (A p_c - [c == t] B - S w_c) * d_c,
// everything already multiplied by the row's grad_loss.
struct BwdRow {
  float lse;
  float a;         // g (w_t ((1 - eps) + 2 z_loss lse) + eps/C sum(w))
  float b;         // g w_t (1 - eps), subtracted at c == t
  float s;         // g eps/C, times w_c (times 1 without weights)
  int t;
  bool weighted_smoothing;
  Softcap softcap;

  __device__ __forceinline__ float grad(float x, int col, const float* __restrict__ weight) const {
    float z = x;
    float dz_dx = 1.0f;
    if (softcap.cap != 0.0f) {
      const float th = tanhf(x * softcap.inv_cap);
      z = softcap.cap * th;
      dz_dx = 1.0f - th * th;
    }
    const float prob = __expf(z - lse);
    const float w_c = weighted_smoothing ? __ldg(weight + col) : 1.0f;
    const float dz = a * prob - (col == t ? b : 0.0f) - s * w_c;
    return dz * dz_dx;
  }
};

// Writes `value` over row y[0, n) (ignored and out-of-range rows).
template <typename T>
__device__ __forceinline__ void fill_row(T* y, int n, float value) {
  constexpr int V = Vec<T>::kSize;
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const T fill = from_float<T>(value);
  const RowSplit split = split_row(y, n);
  Vec<T> pack;
#pragma unroll
  for (int k = 0; k < V; ++k) pack.v[k] = fill;
  if (tid < split.head) y[tid] = fill;
  for (int v = tid; v < split.num_vecs; v += nthreads) store_vec(y + split.head + v * V, pack);
  const int tail = split.tail_begin + tid;
  if (tail < n) y[tail] = fill;
}

template <typename T>
__device__ __forceinline__ void grad_vec(const Vec<T>& x, T* y, bool vector_store, int col,
                                         const BwdRow& r, const float* __restrict__ weight) {
  constexpr int V = Vec<T>::kSize;
  Vec<T> out;
#pragma unroll
  for (int k = 0; k < V; ++k) out.v[k] = from_float<T>(r.grad(to_float(x.v[k]), col + k, weight));
  if (vector_store) {
    store_vec(y, out);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) y[k] = out.v[k];
  }
}

}  // namespace

// No __restrict__ on x and y here: in place they are the same memory. Every element is
// loaded and then stored by the same thread, and no element is read twice, so the in-place
// kernel has no race; the loads are plain coherent loads (not the read-only path).
template <typename T, typename Index>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSm)
    ce_bwd_kernel(const CrossEntropyBwdParams p) {
  constexpr int V = Vec<T>::kSize;
  const CrossEntropyInputs& in = p.in;
  const int64_t row = blockIdx.x;
  const int n = static_cast<int>(in.classes);
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const T* x = static_cast<const T*>(in.logits) + row * in.logits_row_stride;
  T* y = static_cast<T*>(p.grad) + row * p.grad_row_stride;
  const float* __restrict__ weight = in.weight;

  const int64_t t = load_target<Index>(in, row);
  const bool ignored = t == in.ignore_index;
  if (ignored || t < 0 || t >= in.classes) {  // block-uniform
    fill_row(y, n, ignored ? 0.0f : quiet_nan());
    return;
  }

  const float eps = in.label_smoothing;
  const float smooth = eps / static_cast<float>(n);
  const bool smoothing = eps != 0.0f;
  const float lse = p.lse[row * p.lse_stride];
  const float g = p.grad_loss[row * p.grad_loss_stride];
  const float w_t = weight != nullptr ? weight[t] : 1.0f;
  const float sum_w =
      weight != nullptr ? (smoothing ? *in.weight_sum : 0.0f) : static_cast<float>(n);
  BwdRow r;
  r.lse = lse;
  r.a = g * (w_t * ((1.0f - eps) + 2.0f * in.z_loss * lse) + smooth * sum_w);
  r.b = g * w_t * (1.0f - eps);
  r.s = g * smooth;
  r.t = static_cast<int>(t);
  r.weighted_smoothing = smoothing && weight != nullptr;
  r.softcap = Softcap{in.softcap, in.softcap != 0.0f ? 1.0f / in.softcap : 0.0f};

  const RowSplit split = split_row(x, n);
  const bool vector_store = same_alignment(x, y);  // then y + split.head is aligned too
  if (tid < split.head) y[tid] = from_float<T>(r.grad(to_float(x[tid]), tid, weight));
  const T* xv = x + split.head;
  T* yv = y + split.head;
  int v = tid;
  for (; v + (kUnroll - 1) * nthreads < split.num_vecs; v += kUnroll * nthreads) {
    Vec<T> buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) buf[u] = load_vec(xv + (v + u * nthreads) * V);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int offset = (v + u * nthreads) * V;
      grad_vec(buf[u], yv + offset, vector_store, split.head + offset, r, weight);
    }
  }
  for (; v < split.num_vecs; v += nthreads) {
    grad_vec(load_vec(xv + v * V), yv + v * V, vector_store, split.head + v * V, r, weight);
  }
  const int tail = split.tail_begin + tid;
  if (tail < n) y[tail] = from_float<T>(r.grad(to_float(x[tail]), tail, weight));
}

namespace {

bool sizes_ok(const CrossEntropyInputs& in) {
  return in.rows >= 0 && in.rows <= INT32_MAX && in.classes >= 1 && in.classes <= INT32_MAX;
}

template <typename T, typename Index>
cudaError_t launch_fwd(const CrossEntropyFwdParams& p, cudaStream_t stream) {
  const int threads = ce_threads_per_block(p.in.classes, static_cast<int>(sizeof(T)));
  ce_fwd_kernel<T, Index><<<static_cast<unsigned>(p.in.rows), threads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, typename Index>
cudaError_t launch_bwd(const CrossEntropyBwdParams& p, cudaStream_t stream) {
  const int threads = ce_threads_per_block(p.in.classes, static_cast<int>(sizeof(T)));
  ce_bwd_kernel<T, Index><<<static_cast<unsigned>(p.in.rows), threads, 0, stream>>>(p);
  return cudaGetLastError();
}

// The explicit instantiations: 3 logits dtypes x 2 target dtypes, for each kernel.
template <template <typename, typename> class Launch, typename Params>
cudaError_t dispatch(const Params& p, cudaStream_t stream) {
  const bool i64 = p.in.target_type == IndexType::kInt64;
  switch (p.in.logits_type) {
    case LogitsType::kFloat32:
      return i64 ? Launch<float, int64_t>::run(p, stream) : Launch<float, int32_t>::run(p, stream);
    case LogitsType::kFloat16:
      return i64 ? Launch<__half, int64_t>::run(p, stream)
                 : Launch<__half, int32_t>::run(p, stream);
    case LogitsType::kBFloat16:
      return i64 ? Launch<__nv_bfloat16, int64_t>::run(p, stream)
                 : Launch<__nv_bfloat16, int32_t>::run(p, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T, typename Index>
struct FwdLaunch {
  static cudaError_t run(const CrossEntropyFwdParams& p, cudaStream_t s) {
    return launch_fwd<T, Index>(p, s);
  }
};

template <typename T, typename Index>
struct BwdLaunch {
  static cudaError_t run(const CrossEntropyBwdParams& p, cudaStream_t s) {
    return launch_bwd<T, Index>(p, s);
  }
};

}  // namespace

int ce_threads_per_block(int64_t classes, int element_size) {
  const int64_t vecs = (classes * element_size + kVecBytes - 1) / kVecBytes;
  int threads = kWarpSize;
  while (threads < kMaxThreads && static_cast<int64_t>(threads) * kVecsPerThread < vecs) {
    threads *= 2;
  }
  return threads;
}

cudaError_t ce_fwd(const CrossEntropyFwdParams& params, cudaStream_t stream) {
  if (!sizes_ok(params.in)) return cudaErrorInvalidValue;
  if (params.in.rows == 0) return cudaSuccess;
  return dispatch<FwdLaunch>(params, stream);
}

cudaError_t ce_bwd(const CrossEntropyBwdParams& params, cudaStream_t stream) {
  if (!sizes_ok(params.in)) return cudaErrorInvalidValue;
  if (params.in.rows == 0) return cudaSuccess;
  return dispatch<BwdLaunch>(params, stream);
}

}  // namespace fusedops
