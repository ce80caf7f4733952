// tensor_map.h — host-side TMA descriptors (CUtensorMap) without linking the driver library.
//
// cuTensorMapEncodeTiled is a driver API function; torch extensions link the runtime only,
// so it is fetched once through cudaGetDriverEntryPointByVersion. A descriptor describes a
// 2-D row-major matrix (inner extent contiguous, `ld` elements between rows) and the box one
// TMA load copies; the kernel receives it by value as a __grid_constant__ parameter.
#pragma once

#include <cstdint>
#include <mutex>

#include <cuda.h>
#include <cuda_runtime_api.h>
#include <cudaTypedefs.h>

namespace fusedops {

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &status) == cudaSuccess &&
        status == cudaDriverEntryPointSuccess) {
      encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
    }
  });
  return encode;
}

// A descriptor of the (outer, inner) matrix at `data` (16-byte aligned; ld * element_bytes a
// multiple of 16) loading boxes of (box_outer, box_inner) elements with the 128-byte swizzle
// (box_inner * element_bytes must be 128). Elements outside the matrix are read as zeros.
inline cudaError_t make_tensor_map_2d(CUtensorMap* map, const void* data,
                                      CUtensorMapDataType type, int element_bytes,
                                      uint64_t inner, uint64_t outer, uint64_t ld,
                                      uint32_t box_inner, uint32_t box_outer) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) {
    return cudaErrorNotSupported;
  }
  const cuuint64_t dims[2] = {inner, outer};
  const cuuint64_t strides[1] = {ld * static_cast<uint64_t>(element_bytes)};
  const cuuint32_t box[2] = {box_inner, box_outer};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult result = encode(map, type, 2, const_cast<void*>(data), dims, strides, box,
                                 element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                 CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                 CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return result == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace fusedops
