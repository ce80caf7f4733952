// vec.cuh — 128-bit vector loads and stores, and the split of a row into an unaligned head,
// aligned 16-byte vectors and a tail.
//
// Memory-bound kernels move their data in 16-byte transactions per thread (LDG.E.128 /
// STG.E.128 in SASS): 8 halves, 8 bfloat16s or 4 floats at a time. That needs a 16-byte
// aligned address, which a row of a strided (N, C) tensor need not have: row r starts at
// base + r * row_stride elements, and neither the base (a view's storage offset) nor
// row_stride * sizeof(T) has to be a multiple of 16. So a row is cut in three:
//
//   [0, head)                  scalar accesses up to the first 16-byte boundary (< kSize)
//   [head, tail_begin)         num_vecs aligned vectors of kSize elements
//   [tail_begin, n)            scalar accesses for what is left (< kSize)
//
// The only requirement is that the row pointer is aligned to sizeof(T), which every torch
// tensor's data is. The three ranges tile [0, n) exactly, for any n >= 0 and any
// sizeof(T)-aligned row: nothing outside the row is ever touched.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fusedops {

constexpr int kVecBytes = 16;

template <typename T>
struct alignas(kVecBytes) Vec {
  static constexpr int kSize = kVecBytes / static_cast<int>(sizeof(T));
  T v[kSize];
};

// Plain (coherent) 128-bit load: safe when the same kernel writes the same addresses later,
// as the in-place backward does.
template <typename T>
__device__ __forceinline__ Vec<T> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T>*>(p);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T>& x) {
  *reinterpret_cast<Vec<T>*>(p) = x;
}

struct RowSplit {
  int head;        // scalar elements before the first 16-byte boundary, in [0, kSize)
  int num_vecs;    // aligned vectors after the head
  int tail_begin;  // head + num_vecs * kSize; scalar elements from here to n
};

// The split of the n elements starting at `row` (which must be sizeof(T)-aligned).
template <typename T>
__host__ __device__ __forceinline__ RowSplit split_row(const T* row, int n) {
  constexpr int kSize = Vec<T>::kSize;
  const int misalign =
      static_cast<int>((reinterpret_cast<uintptr_t>(row) % kVecBytes) / sizeof(T));
  int head = misalign == 0 ? 0 : kSize - misalign;
  head = head < n ? head : n;
  const int num_vecs = (n - head) / kSize;
  return RowSplit{head, num_vecs, head + num_vecs * kSize};
}

// Whether two rows have the same offset within a 16-byte window, so that one split serves both.
template <typename T>
__host__ __device__ __forceinline__ bool same_alignment(const T* a, const T* b) {
  return reinterpret_cast<uintptr_t>(a) % kVecBytes == reinterpret_cast<uintptr_t>(b) % kVecBytes;
}

}  // namespace fusedops
