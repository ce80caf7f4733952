// reduce.cuh — warp and block reductions: sum, max, and the online-softmax (max, sum) pair.
//
// Block reductions assume blockDim.x is a multiple of 32 (every launcher in csrc/ picks one)
// and are called by all threads of the block; the result is valid in thread 0 only (the
// *_to_thread0 forms) or in every thread (block_reduce_sum_all), as named.
#pragma once

#include <cuda_runtime.h>

namespace fusedops {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;
constexpr int kMaxWarps = 1024 / kWarpSize;

__device__ __forceinline__ float warp_reduce_sum(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(kFullMask, x, offset);
  }
  return x;
}

__device__ __forceinline__ float warp_reduce_max(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  }
  return x;
}

// A partial log-sum-exp: the running maximum m and sum s = sum_k exp(z_k - m) over the
// elements seen so far. The empty set is (-inf, 0).
//
// Infinities never make a NaN that the data does not contain:
//  * rescaling s from m to m' >= m uses exp(m - m'), except when m == m' (both -inf or both
//    +inf), where the factor is exactly 1 (exp(0)) instead of exp(inf - inf) = NaN;
//  * adding an element z uses exp(z - m), except when z == m, where it adds 1 (or 0 when
//    m == -inf: an all -inf set has s = 0, and its lse = -inf + log(0) = -inf);
// so -inf logits contribute 0, a +inf logit gives lse = +inf, and only a NaN logit makes s NaN.
struct MaxSum {
  float m;
  float s;
};

__device__ __forceinline__ float online_rescale(float m_old, float m_new) {
  return m_old == m_new ? 1.0f : __expf(m_old - m_new);
}

// exp(z - m) for an element z <= m (m the running max, already including z).
__device__ __forceinline__ float online_term(float z, float m) {
  const float hit = m == -INFINITY ? 0.0f : 1.0f;
  return z == m ? hit : __expf(z - m);
}

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  return MaxSum{m, a.s * online_rescale(a.m, m) + b.s * online_rescale(b.m, m)};
}

__device__ __forceinline__ MaxSum warp_reduce_max_sum(MaxSum x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const MaxSum other{__shfl_xor_sync(kFullMask, x.m, offset),
                       __shfl_xor_sync(kFullMask, x.s, offset)};
    x = combine(x, other);
  }
  return x;
}

// Reduces each thread's (m, s) pair and its `extra` float (summed) over the block; the
// result is valid in thread 0. `scratch` holds 3 * kMaxWarps floats of shared memory.
__device__ __forceinline__ void block_reduce_max_sum_to_thread0(MaxSum& x, float& extra,
                                                                float* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  x = warp_reduce_max_sum(x);
  extra = warp_reduce_sum(extra);
  if (num_warps == 1) {
    return;
  }
  if (lane == 0) {
    scratch[warp] = x.m;
    scratch[kMaxWarps + warp] = x.s;
    scratch[2 * kMaxWarps + warp] = extra;
  }
  __syncthreads();
  if (warp == 0) {
    const bool valid = lane < num_warps;
    x = valid ? MaxSum{scratch[lane], scratch[kMaxWarps + lane]} : MaxSum{-INFINITY, 0.0f};
    extra = valid ? scratch[2 * kMaxWarps + lane] : 0.0f;
    x = warp_reduce_max_sum(x);
    extra = warp_reduce_sum(extra);
  }
}

// Sum over the block, returned to every thread. `scratch` holds kMaxWarps floats; the
// trailing barrier makes it safe to call again with the same scratch.
__device__ __forceinline__ float block_reduce_sum_all(float x, float* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  x = warp_reduce_sum(x);
  if (num_warps == 1) {
    return x;
  }
  if (lane == 0) {
    scratch[warp] = x;
  }
  __syncthreads();
  x = lane < num_warps ? scratch[lane] : 0.0f;
  x = warp_reduce_sum(x);
  __syncthreads();
  return x;
}

}  // namespace fusedops
