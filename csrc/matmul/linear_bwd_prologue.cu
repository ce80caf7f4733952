// linear_bwd_prologue.cu — the backward of the fused linear before its GEMMs: dz and the
// bias gradient, in one pass over grad_out (and saved), deterministic.
//
// The math, for 0 <= i < m, 0 <= j < n (see gemm.h and linear_contract.py):
//
//   d[i, j]      = grad_out[i, j] * act'(saved[i, j])     in float32 (d = grad_out for kNone)
//   dz[i, j]     = d[i, j] rounded to the storage type    (when dz != nullptr)
//   grad_bias[j] = sum_i d[i, j]                          in float32 (when grad_bias != nullptr)
//
// T is __half, __nv_bfloat16 or float (GemmType::kFloat32). For float, "rounded to the
// storage type" is the identity: dz is the float32 product d itself, and kNone copies.
//
// act' is activation_derivative (activation.cuh): from the pre-activation z, or for kRelu from
// the forward's output (relu'(z) = [out > 0]). The product is written as __fmul_rn so that
// it is never contracted into the accumulation (an FMA would sum the exact product rather
// than d). The bias gradient sums the float32 d BEFORE it is rounded to dz's type: that is
// what the reference does (torch_ref._linear_bwd forms dz in float32, sums it, and rounds
// each result separately), and what torch's own backward would do with a float32 dz. Summing
// the rounded dz instead would add a half-ulp of bf16 (2**-9 relative) per term for nothing.
// For kRelu the product grad * [out > 0] follows the reference literally: an inf or NaN
// gradient where out <= 0 gives NaN (torch's threshold_backward would give 0 there).
//
// The design. The op is memory-bound: per element it reads 2 bytes (grad_out; kNone) or 4
// (grad_out and saved) and writes 2 (dz), twice that for float, with a few dozen FLOPs at
// most (erff and expf for kGelu, which is close to the balance point on an H100 for half/bf16;
// the others, and float, are well below it).
// So every element is touched exactly once, in 16-byte vectors, and the bias reduction
// rides along in registers instead of a second pass over an (m, n) tensor:
//
//   kernel 1  linear_bwd_prologue_kernel  a 2-D grid: blockIdx.x = a strip of columns,
//             blockIdx.y = a block of kRows = 128 rows (a grid-stride loop when there are
//             more than 65535 row blocks). Block = (col_threads, row_threads) threads,
//             col_threads * row_threads = 128; each thread owns one run of 8 columns
//             (one 16-byte vector of half/bf16, two of float) and the rows rt,
//             rt + row_threads, ... of the block's 128. A warp of 32 column threads covers
//             512 (1024 for float) contiguous bytes of a row: coalesced. Each thread issues
//             the loads of kUnroll = 2 rows before using them, keeps 8 float32 column sums
//             in registers, writes dz, and at the end of the row block the 128 threads
//             combine their sums through shared memory:
//             column c of the strip is sum over rt = 0 .. row_threads - 1, in that order.
//             The result is written to partials[row_block * n + j] (coalesced over j).
//   kernel 2  linear_bwd_bias_kernel (only with grad_bias): one thread per column adds
//             partials[0 .. row_blocks) in order into grad_bias[j] (coalesced over j).
//
// Why this partition: the reduction is over rows and the contiguous dimension is columns, so
// a thread keeps the same columns for all its rows and its sums never leave registers until
// the end of the row block; the only cross-thread step is one 4 KB shared-memory combine per
// 128 rows. The partials are 4 bytes per column per 128 rows: 1/64 of a bf16 grad_out, so
// the second pass is cheap (a (16384, 4096) grad_out has 128 x 4096 partials, 2 MB). The
// run is 8 columns for every T (two vectors for float), so the partition, the partials and
// the order of every sum depend on (m, n) only, never on the type. No
// atomics anywhere, and every sum is taken in an order that depends only on (m, n): thread
// rt adds its rows in increasing order, the threads of a column are combined in increasing
// rt, the row blocks in increasing order. So the same inputs give bitwise the same gradient
// run after run, whatever the grid scheduling, the strides or the alignments (below).
//
// Narrow outputs: the strip is col_threads * 8 columns with col_threads the smallest of
// 4, 8, 16, 32 covering n (32 beyond 128 columns), and row_threads = 128 / col_threads, so
// a small n does not leave most of the block idle. The shape depends on n only (part of
// the fixed summation order above).
//
// Alignment: a run of 8 columns starts at a column that is a multiple of 8, so it is one
// aligned 16-byte vector (two for float) in every row when the run is whole (col + 8 <= n)
// and every tensor touched (grad_out, saved unless kNone, dz when written) has a 16-byte
// aligned base and 16-byte aligned rows: a leading dimension that is a multiple of
// Vec<T>::kSize, 8 for half/bf16 and 4 for float (the host checks this once: `vectorizable`).
// Otherwise the thread moves its run element by element, with the same arithmetic and the
// same summation order, so an unaligned view (an odd leading dimension, a storage offset)
// is slower but gives bitwise the same result. Only sizeof(T) alignment is required, which
// every torch tensor has. In the usual case (contiguous tensors, n % 8 == 0) only the last
// run of a row can be partial, and only when n % 8 != 0.
//
// Registers and loads in flight: the batch of kUnroll rows is loaded unconditionally (a row
// past the end of the last row block reloads one of the thread's own rows and its result is
// dropped), because loads or arithmetic under a per-row condition let nvcc sink each load
// into its branch and wait for it before issuing the next one. 128 threads and 5 blocks per
// SM cap kernel 1 at 96 registers (kGelu and kGeluTanh use them all): 640 threads per SM,
// each with 2 or 4 16-byte loads in flight (4 or 8 for float), 20 to 40 KB per SM (40 to
// 80 for float), above what an H100 needs to stay at its bandwidth (about 3.35 TB/s x
// 0.5 us / 132 SMs ~ 13 KB). Those are the loads the source issues together; under the
// 96-register cap ptxas issues only part of the batch up front in the kGelu/kGeluTanh
// bodies and the rest as registers free up (as it does for half/bf16 too). 256 threads and 3
// blocks (80 registers, 768 threads) made ptxas spill in the kGelu body; 2 blocks of 256
// (128 registers) would leave 512 threads. The activation is a block-uniform switch in one
// kernel per storage type, so the kernel gets the registers of its heaviest body (kNone
// alone would need about 52).
//
// Aliasing: dz may be grad_out or saved itself (in place, same leading dimension): every
// element is loaded and then stored by the same thread, all loads of a batch before its
// stores, and never loaded after its store. So the loads are plain coherent loads and nothing
// is __restrict__. Apart from that, dz must not overlap the inputs, and its rows must not
// overlap each other (ld_dz >= n when m > 1, checked).
//
// Indexing: row offsets (row * ld) and partial offsets (row_block * n) are int64; m and n are
// below 2**31, so the column strips (at most 2**31 / 32) fit gridDim.x and the row blocks
// (at most 2**24) are looped over a gridDim.y of at most 65535.

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/check.cuh"
#include "../common/dtype.cuh"
#include "../common/vec.cuh"
#include "activation.cuh"
#include "gemm.h"

namespace fusedops {
namespace {

// Tune numbers, chosen on paper (bytes in flight per SM, registers), not yet measured.
constexpr int kRows = 128;           // rows per row block: one partial per column per block
constexpr int kThreads = 128;        // threads per block of kernel 1
constexpr int kMinBlocksPerSm = 5;   // caps kernel 1 at 96 registers (see the top comment)
constexpr int kRun = 8;              // columns per thread: one 16-byte vector of half/bf16,
                                     // two of float
constexpr int kUnroll = 2;           // rows whose loads a thread issues before using them
constexpr int kMinColThreads = 4;    // narrowest strip: 32 columns
constexpr int kMaxColThreads = 32;   // widest strip: 256 columns
constexpr int64_t kMaxGridY = 65535;
constexpr int kBiasThreads = 256;    // kernel 2: threads (= columns) per block
constexpr int kBiasUnroll = 8;       // kernel 2: partials loaded before they are added

static_assert(Vec<__half>::kSize == kRun && Vec<__nv_bfloat16>::kSize == kRun &&
                  kRun == 2 * Vec<float>::kSize,
              "a run of columns is one 16-byte vector of half/bf16, two of float");
static_assert(kThreads % kMaxColThreads == 0 && kThreads / kMinColThreads <= kRows,
              "every row thread has at least one row of a full row block");

__host__ __device__ __forceinline__ int64_t num_row_blocks(int64_t m) {
  return (m + kRows - 1) / kRows;
}

// Column threads of kernel 1's block for n columns (see the top comment).
int col_threads_for(int64_t n) {
  int t = kMinColThreads;
  while (t < kMaxColThreads && static_cast<int64_t>(t) * kRun < n) t *= 2;
  return t;
}

// A thread's run of kRun columns of one row as 16-byte vectors: one for half/bf16, two for
// float (as Run<T> in epilogue.cuh).
template <typename T>
struct ColumnRun {
  static constexpr int kVectors = kRun / Vec<T>::kSize;
  Vec<T> vec[kVectors];
  __device__ __forceinline__ T& operator[](int k) {
    return vec[k / Vec<T>::kSize].v[k % Vec<T>::kSize];
  }
  __device__ __forceinline__ const T& operator[](int k) const {
    return vec[k / Vec<T>::kSize].v[k % Vec<T>::kSize];
  }
};

// The first `valid` elements of the run at p, zeros after them; 16-byte loads when kVector
// (then valid == kRun and p is 16-byte aligned).
template <bool kVector, typename T>
__device__ __forceinline__ ColumnRun<T> load_run(const T* p, int valid) {
  ColumnRun<T> x;
  if constexpr (kVector) {
#pragma unroll
    for (int i = 0; i < ColumnRun<T>::kVectors; ++i) x.vec[i] = load_vec(p + i * Vec<T>::kSize);
  } else {
#pragma unroll
    for (int k = 0; k < kRun; ++k) {
      x[k] = from_float<T>(0.0f);
      if (k < valid) x[k] = p[k];
    }
  }
  return x;
}

__device__ __forceinline__ uint32_t bits(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ uint32_t bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }

// One 16-byte store of x at p (16-byte aligned). Not store_vec: in this kernel nvcc lowers
// that aggregate copy (and a plain uint4 store) to four 4-byte stores; st.global.v4.b32 (and
// .v4.f32 for float) is an STG.E.128 (a plain weak store, as st.global would be; __stwb's .wb
// became STG.E.128.STRONG.SM).
__device__ __forceinline__ void store_vec_packed(float* p, const Vec<float>& x) {
  asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(x.v[0]), "f"(x.v[1]),
               "f"(x.v[2]), "f"(x.v[3])
               : "memory");
}

template <typename T>
__device__ __forceinline__ void store_vec_packed(T* p, const Vec<T>& x) {
  static_assert(Vec<T>::kSize == 8, "16-bit types: two per 32-bit word");
  uint4 w;
  w.x = bits(x.v[0]) | (bits(x.v[1]) << 16);
  w.y = bits(x.v[2]) | (bits(x.v[3]) << 16);
  w.z = bits(x.v[4]) | (bits(x.v[5]) << 16);
  w.w = bits(x.v[6]) | (bits(x.v[7]) << 16);
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w.x), "r"(w.y), "r"(w.z),
               "r"(w.w)
               : "memory");
}

template <bool kVector, typename T>
__device__ __forceinline__ void store_run(T* p, const ColumnRun<T>& x, int valid) {
  if constexpr (kVector) {
#pragma unroll
    for (int i = 0; i < ColumnRun<T>::kVectors; ++i) {
      store_vec_packed(p + i * Vec<T>::kSize, x.vec[i]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < kRun; ++k) {
      if (k < valid) p[k] = x[k];
    }
  }
}

// One thread's rows of one row block: rows threadIdx.y, + blockDim.y, ... below `rows`,
// starting at row0, for the run of `valid` columns at col. Writes dz and adds d into acc,
// row by row in increasing order. kVector: 16-byte accesses, two per run for float (the run
// is whole and every row of every tensor is 16-byte aligned at col); otherwise element by
// element. Both forms compute the same d and add it in the same order. The loads of kUnroll
// rows are issued together, before any of them is used (in the source; see the top comment
// for what ptxas makes of it in the heavy bodies). rows >= 1.
template <typename T, Activation kAct, bool kVector>
__device__ __forceinline__ void run_rows(const LinearBwdPrologueParams& p, int64_t row0, int rows,
                                         int64_t col, int valid, float (&acc)[kRun]) {
  constexpr bool kUsesSaved = kAct != Activation::kNone;
  const int row_threads = blockDim.y;
  const T* grad_out = static_cast<const T*>(p.grad_out);
  const T* saved = static_cast<const T*>(p.saved);
  T* dz = static_cast<T*>(p.dz);
  for (int r0 = threadIdx.y; r0 < rows; r0 += kUnroll * row_threads) {
    ColumnRun<T> g[kUnroll];
    ColumnRun<T> s[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      // A row past the end (only in the last, partial row block) loads the batch's first
      // row (r0 < rows, this thread's own) again and is computed without keeping the result:
      // loads and arithmetic under a condition let the compiler sink each row's loads into
      // its branch (or unpack the vector there), one row's loads waiting for the previous.
      const int r = r0 + u * row_threads;
      const int64_t row = row0 + (r < rows ? r : r0);
      g[u] = load_run<kVector>(grad_out + row * p.ld_grad_out + col, valid);
      if (kUsesSaved) s[u] = load_run<kVector>(saved + row * p.ld_saved + col, valid);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const bool in_block = r0 + u * row_threads < rows;
      ColumnRun<T> out;
#pragma unroll
      for (int k = 0; k < kRun; ++k) {
        const float gk = to_float(g[u][k]);
        float d = gk;
        if (kUsesSaved) d = __fmul_rn(gk, activation_derivative(to_float(s[u][k]), kAct));
        // Columns k >= valid add 0 (zero-filled) and are never written.
        if (in_block) acc[k] += d;
        out[k] = kUsesSaved ? from_float<T>(d) : g[u][k];  // kNone: an exact copy
      }
      if (in_block && dz != nullptr) {
        store_run<kVector>(dz + (row0 + r0 + u * row_threads) * p.ld_dz + col, out, valid);
      }
    }
  }
}

// Kernel 1's work for one activation (a compile-time constant, so act' is inlined without a
// switch per element). `scratch` holds kThreads * kRun floats of shared memory.
// `vectorizable`: every tensor touched has a 16-byte aligned base and a leading dimension
// that is a multiple of Vec<T>::kSize (or one row), so every whole run is aligned vectors.
template <typename T, Activation kAct>
__device__ __forceinline__ void prologue_body(const LinearBwdPrologueParams& p, bool vectorizable,
                                              float* scratch) {
  const int ct = threadIdx.x;  // column thread
  const int rt = threadIdx.y;  // row thread
  const int col_threads = blockDim.x;
  const int row_threads = blockDim.y;
  const int strip_cols = col_threads * kRun;
  const int tid = rt * col_threads + ct;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * strip_cols;
  const int64_t col = col0 + static_cast<int64_t>(ct) * kRun;
  const int64_t left = p.n - col;
  const int valid = left <= 0 ? 0 : (left < kRun ? static_cast<int>(left) : kRun);
  const bool vector = vectorizable && valid == kRun;
  const bool want_bias = p.grad_bias != nullptr;
  const int64_t row_blocks = num_row_blocks(p.m);

  for (int64_t rb = blockIdx.y; rb < row_blocks; rb += gridDim.y) {  // block-uniform
    const int64_t row0 = rb * kRows;
    const int rows = p.m - row0 < kRows ? static_cast<int>(p.m - row0) : kRows;
    float acc[kRun];
#pragma unroll
    for (int k = 0; k < kRun; ++k) acc[k] = 0.0f;

    // No barrier inside either branch: threads may take different ones (the last run of
    // the last strip is partial) or none (runs past n).
    if (vector) {
      run_rows<T, kAct, true>(p, row0, rows, col, valid, acc);
    } else if (valid > 0) {
      run_rows<T, kAct, false>(p, row0, rows, col, valid, acc);
    }

    if (want_bias) {  // block-uniform
      // scratch[rt * strip_cols + c] = row thread rt's sum of strip column c.
      float4* mine = reinterpret_cast<float4*>(scratch + tid * kRun);
      mine[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
      mine[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
      __syncthreads();
      for (int c = tid; c < strip_cols; c += kThreads) {
        float sum = 0.0f;
        for (int q = 0; q < row_threads; ++q) sum += scratch[q * strip_cols + c];
        const int64_t j = col0 + c;
        if (j < p.n) p.partials[rb * p.n + j] = sum;
      }
      __syncthreads();  // scratch is rewritten by the next row block
    }
  }
}

}  // namespace

// The kernels live in namespace fusedops (not the anonymous namespace) so that profilers and
// tools/check_sass.py see stable names. The activation is a block-uniform switch over five
// specialised bodies: three instantiations (the storage types, dispatched in
// linear_bwd_prologue below) instead of fifteen.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    linear_bwd_prologue_kernel(const LinearBwdPrologueParams p, bool vectorizable) {
  __shared__ __align__(16) float scratch[kThreads * kRun];
  switch (p.activation) {
    case Activation::kRelu:
      prologue_body<T, Activation::kRelu>(p, vectorizable, scratch);
      break;
    case Activation::kGelu:
      prologue_body<T, Activation::kGelu>(p, vectorizable, scratch);
      break;
    case Activation::kGeluTanh:
      prologue_body<T, Activation::kGeluTanh>(p, vectorizable, scratch);
      break;
    case Activation::kSilu:
      prologue_body<T, Activation::kSilu>(p, vectorizable, scratch);
      break;
    default:
      prologue_body<T, Activation::kNone>(p, vectorizable, scratch);
      break;
  }
}

// grad_bias[j] = sum over row blocks rb = 0, 1, ... of partials[rb * n + j], in that order.
// row_blocks == 0 (m == 0) writes zeros.
__global__ void __launch_bounds__(kBiasThreads)
    linear_bwd_bias_kernel(const float* partials, int64_t row_blocks, int64_t n,
                           float* grad_bias) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kBiasThreads + threadIdx.x;
  if (j >= n) return;
  const float* column = partials + j;
  float sum = 0.0f;
  int64_t rb = 0;
  for (; rb + kBiasUnroll <= row_blocks; rb += kBiasUnroll) {
    float x[kBiasUnroll];
#pragma unroll
    for (int u = 0; u < kBiasUnroll; ++u) x[u] = column[(rb + u) * n];
#pragma unroll
    for (int u = 0; u < kBiasUnroll; ++u) sum += x[u];
  }
  for (; rb < row_blocks; ++rb) sum += column[rb * n];
  grad_bias[j] = sum;
}

namespace {

bool aligned_to(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// The documented ranges; called before anything is launched.
bool args_ok(const LinearBwdPrologueParams& p) {
  if (p.m < 0 || p.m > INT32_MAX || p.n < 0 || p.n > INT32_MAX) return false;
  if (p.type != GemmType::kFloat16 && p.type != GemmType::kBFloat16 &&
      p.type != GemmType::kFloat32) {
    return false;
  }
  const int act = static_cast<int>(p.activation);
  if (act < static_cast<int>(Activation::kNone) || act > static_cast<int>(Activation::kSilu)) {
    return false;
  }
  if (p.grad_bias != nullptr && !aligned_to(p.grad_bias, sizeof(float))) return false;
  if (p.m == 0 || p.n == 0 || (p.dz == nullptr && p.grad_bias == nullptr)) return true;
  // Elements are read and written: every tensor involved must be there, aligned to its type.
  const size_t elem = p.type == GemmType::kFloat32 ? sizeof(float) : sizeof(__half);
  if (p.grad_out == nullptr || !aligned_to(p.grad_out, elem) || p.ld_grad_out < 0) return false;
  if (p.activation != Activation::kNone &&
      (p.saved == nullptr || !aligned_to(p.saved, elem) || p.ld_saved < 0)) {
    return false;
  }
  if (p.dz != nullptr && (!aligned_to(p.dz, elem) || (p.m > 1 && p.ld_dz < p.n))) return false;
  if (p.grad_bias != nullptr && (p.partials == nullptr || !aligned_to(p.partials, sizeof(float)))) {
    return false;
  }
  return true;
}

// Whether every row of every tensor kernel 1 touches is 16-byte aligned at every multiple of
// 8 columns: 16-byte aligned bases and 16-byte aligned row strides, i.e. leading dimensions
// that are multiples of Vec<T>::kSize (8 for half/bf16, 4 for float; any leading dimension
// when there is a single row). A column multiple of 8 is then 16-byte aligned for every T.
template <typename T>
bool rows_vectorizable(const LinearBwdPrologueParams& p) {
  auto ok = [&](const void* base, int64_t ld) {
    return aligned_to(base, kVecBytes) && (p.m == 1 || ld % Vec<T>::kSize == 0);
  };
  return ok(p.grad_out, p.ld_grad_out) &&
         (p.activation == Activation::kNone || ok(p.saved, p.ld_saved)) &&
         (p.dz == nullptr || ok(p.dz, p.ld_dz));
}

template <typename T>
cudaError_t launch_prologue(const LinearBwdPrologueParams& p, cudaStream_t stream) {
  const int col_threads = col_threads_for(p.n);
  const int strip_cols = col_threads * kRun;
  const int64_t strips = (p.n + strip_cols - 1) / strip_cols;  // <= 2**31 / 32
  const int64_t row_blocks = num_row_blocks(p.m);
  const dim3 grid(static_cast<unsigned>(strips),
                  static_cast<unsigned>(row_blocks < kMaxGridY ? row_blocks : kMaxGridY));
  const dim3 block(col_threads, kThreads / col_threads);
  linear_bwd_prologue_kernel<T><<<grid, block, 0, stream>>>(p, rows_vectorizable<T>(p));
  return cudaGetLastError();
}

}  // namespace

int64_t linear_bwd_prologue_partials_size(int64_t m, int64_t n) {
  if (m <= 0 || n <= 0) return 0;
  return num_row_blocks(m) * n;
}

cudaError_t linear_bwd_prologue(const LinearBwdPrologueParams& params, cudaStream_t stream) {
  const LinearBwdPrologueParams& p = params;
  if (!args_ok(p)) return cudaErrorInvalidValue;
  if (p.dz == nullptr && p.grad_bias == nullptr) return cudaSuccess;
  if (p.n == 0) return cudaSuccess;
  if (p.m > 0) {
    if (p.type == GemmType::kFloat16) {
      FUSEDOPS_RETURN_IF_ERROR(launch_prologue<__half>(p, stream));
    } else if (p.type == GemmType::kFloat32) {
      FUSEDOPS_RETURN_IF_ERROR(launch_prologue<float>(p, stream));
    } else {
      FUSEDOPS_RETURN_IF_ERROR(launch_prologue<__nv_bfloat16>(p, stream));
    }
  }
  if (p.grad_bias != nullptr) {
    const int64_t blocks = (p.n + kBiasThreads - 1) / kBiasThreads;
    linear_bwd_bias_kernel<<<static_cast<unsigned>(blocks), kBiasThreads, 0, stream>>>(
        p.partials, num_row_blocks(p.m), p.n, p.grad_bias);
    FUSEDOPS_RETURN_IF_ERROR(cudaGetLastError());
  }
  return cudaSuccess;
}

}  // namespace fusedops
