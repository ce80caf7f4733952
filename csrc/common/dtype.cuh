// dtype.cuh — the storage types kernels read and write, and their conversion to float.
//
// Every kernel accumulates in float32: it loads T, converts with to_float, computes, and
// converts back with from_float<T> (round to nearest even) only when it stores. torch's
// extension build defines __CUDA_NO_HALF_OPERATORS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__, so
// only the explicit intrinsics below are used, never implicit conversions.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fusedops {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two floats rounded to T and packed in one 32-bit register, `lo` in the low half: the
// operand format of the tensor-core instructions (mma.sync and wgmma A fragments).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t bits;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    static_assert(sizeof(v) == sizeof(bits), "");
    memcpy(&bits, &v, sizeof(bits));
  } else {
    static_assert(std::is_same_v<T, __half>, "float16 or bfloat16");
    const __half2 v = __floats2half2_rn(lo, hi);
    static_assert(sizeof(v) == sizeof(bits), "");
    memcpy(&bits, &v, sizeof(bits));
  }
  return bits;
}

}  // namespace fusedops
