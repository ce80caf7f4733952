// epilogue.cuh — the fused epilogue both GEMM kernels share: bias, residual, activation and
// the output cast, applied while a float32 accumulator tile goes from shared memory to
// global memory.
//
// Why through shared memory: a tensor-core accumulator fragment gives each thread two
// adjacent columns of a few rows, so storing it directly writes 4-byte pieces scattered over
// many rows. The kernels first spill the fragment to a float32 tile in shared memory (a row
// stride of COLS + kTilePad floats keeps those writes free of bank conflicts), then here
// each thread takes runs of 8 consecutive columns of one row: two 16-byte reads of the tile,
// 16-byte loads of the residual and 16-byte stores of the output and of the pre-activation
// (two of each for float32),
// coalesced across the threads of a row.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/dtype.cuh"
#include "../common/vec.cuh"
#include "activation.cuh"
#include "gemm.h"

namespace fusedops {

// Padding of a row of the float32 staging tile, in floats (keeps rows 16-byte aligned).
constexpr int kTilePad = 4;
constexpr int kEpilogueRun = 8;  // columns one thread handles at a time (16 bytes of bf16)

template <typename T>
struct StorageType;
template <>
struct StorageType<__half> {
  static constexpr GemmType value = GemmType::kFloat16;
};
template <>
struct StorageType<__nv_bfloat16> {
  static constexpr GemmType value = GemmType::kBFloat16;
};
template <>
struct StorageType<float> {
  static constexpr GemmType value = GemmType::kFloat32;
};

// A run of 8 elements of T as 16-byte vectors (one for 16-bit types, two for float32).
template <typename T>
struct Run {
  static constexpr int kVectors = kEpilogueRun / Vec<T>::kSize;
  Vec<T> vec[kVectors];
  __device__ __forceinline__ T& operator[](int e) {
    return vec[e / Vec<T>::kSize].v[e % Vec<T>::kSize];
  }
};

template <typename T>
__device__ __forceinline__ void load_run(const T* p, Run<T>& run) {
#pragma unroll
  for (int i = 0; i < Run<T>::kVectors; ++i) run.vec[i] = load_vec(p + i * Vec<T>::kSize);
}

template <typename T>
__device__ __forceinline__ void store_run(T* p, const Run<T>& run) {
#pragma unroll
  for (int i = 0; i < Run<T>::kVectors; ++i) store_vec(p + i * Vec<T>::kSize, run.vec[i]);
}

// Whether every output-shaped tensor of `p` allows 16-byte accesses on runs of 8 columns
// starting at a multiple of 8 (leading dimensions multiples of 8, bases 16-byte aligned).
inline bool epilogue_vectorizable(const GemmParams& p) {
  auto aligned = [](const void* ptr, int64_t ld) {
    return ptr == nullptr || (reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && ld % 8 == 0);
  };
  const bool bias_ok = p.bias == nullptr || reinterpret_cast<uintptr_t>(p.bias) % 16 == 0;
  return bias_ok && aligned(p.residual, p.ld_residual) && aligned(p.out, p.ld_out) &&
         aligned(p.preact, p.ld_preact);
}

// Stores the tile rows [0, ROWS) x columns [0, COLS) of `tile` (float32, row stride
// COLS + kTilePad) as rows row0.. and columns col0.. of the output, with THREADS threads
// (thread = 0 .. THREADS-1) cooperating. Rows >= m and columns >= n are skipped.
template <typename T, int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void epilogue_store_tile(const float* tile, int thread, int64_t row0,
                                                    int64_t col0, const GemmParams& p,
                                                    bool vectorizable) {
  static_assert(COLS % kEpilogueRun == 0, "tile columns must be runs of 8");
  constexpr int kRunsPerRow = COLS / kEpilogueRun;
  constexpr int kTileLd = COLS + kTilePad;
  const T* residual = static_cast<const T*>(p.residual);
  T* preact = static_cast<T*>(p.preact);

#pragma unroll 1
  for (int run = thread; run < ROWS * kRunsPerRow; run += THREADS) {
    const int r = run / kRunsPerRow;
    const int c = (run % kRunsPerRow) * kEpilogueRun;
    const int64_t row = row0 + r;
    const int64_t col = col0 + c;
    if (row >= p.m || col >= p.n) {
      continue;
    }
    float z[kEpilogueRun];
    const float4 lo = *reinterpret_cast<const float4*>(tile + r * kTileLd + c);
    const float4 hi = *reinterpret_cast<const float4*>(tile + r * kTileLd + c + 4);
    z[0] = lo.x; z[1] = lo.y; z[2] = lo.z; z[3] = lo.w;
    z[4] = hi.x; z[5] = hi.y; z[6] = hi.z; z[7] = hi.w;
    const int valid = p.n - col < kEpilogueRun ? static_cast<int>(p.n - col) : kEpilogueRun;
    const bool whole_run = vectorizable && valid == kEpilogueRun;

    if (p.accumulate) {  // float32 out += z, nothing else
      float* out = static_cast<float*>(p.out) + row * p.ld_out + col;
      if (whole_run) {
        float4 a = *reinterpret_cast<float4*>(out);
        float4 b = *reinterpret_cast<float4*>(out + 4);
        a.x += z[0]; a.y += z[1]; a.z += z[2]; a.w += z[3];
        b.x += z[4]; b.y += z[5]; b.z += z[6]; b.w += z[7];
        *reinterpret_cast<float4*>(out) = a;
        *reinterpret_cast<float4*>(out + 4) = b;
      } else {
#pragma unroll
        for (int e = 0; e < kEpilogueRun; ++e) {
          if (e < valid) out[e] += z[e];
        }
      }
      continue;
    }

    if (p.bias != nullptr) {
      if (whole_run) {
        const float4 b0 = *reinterpret_cast<const float4*>(p.bias + col);
        const float4 b1 = *reinterpret_cast<const float4*>(p.bias + col + 4);
        z[0] += b0.x; z[1] += b0.y; z[2] += b0.z; z[3] += b0.w;
        z[4] += b1.x; z[5] += b1.y; z[6] += b1.z; z[7] += b1.w;
      } else {
#pragma unroll
        for (int e = 0; e < kEpilogueRun; ++e) {
          if (e < valid) z[e] += p.bias[col + e];
        }
      }
    }
    if (residual != nullptr) {
      const T* res = residual + row * p.ld_residual + col;
      if (whole_run) {
        Run<T> v;
        load_run(res, v);
#pragma unroll
        for (int e = 0; e < kEpilogueRun; ++e) z[e] += to_float(v[e]);
      } else {
#pragma unroll
        for (int e = 0; e < kEpilogueRun; ++e) {
          if (e < valid) z[e] += to_float(res[e]);
        }
      }
    }
    Run<T> out_run, preact_run;
#pragma unroll
    for (int e = 0; e < kEpilogueRun; ++e) {
      preact_run[e] = from_float<T>(z[e]);
      out_run[e] = from_float<T>(activate(z[e], p.activation));
    }
    T* out = static_cast<T*>(p.out) + row * p.ld_out + col;
    T* pre = preact != nullptr ? preact + row * p.ld_preact + col : nullptr;
    if (whole_run) {
      store_run(out, out_run);
      if (pre != nullptr) store_run(pre, preact_run);
    } else {
#pragma unroll
      for (int e = 0; e < kEpilogueRun; ++e) {
        if (e < valid) {
          out[e] = out_run[e];
          if (pre != nullptr) pre[e] = preact_run[e];
        }
      }
    }
  }
}

}  // namespace fusedops
