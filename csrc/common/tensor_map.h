// tensor_map.h — host-side TMA descriptors (CUtensorMap) without linking the driver library.
//
// cuTensorMapEncodeTiled is a driver API function; torch extensions link the runtime only,
// so it is fetched once through cudaGetDriverEntryPointByVersion. A descriptor describes a
// tensor of rank 2..5 (innermost dimension contiguous) and the box one TMA load copies, always
// with the 128-byte swizzle; the kernel receives it by value as a __grid_constant__ parameter.
// Also here: the check that a build's sm_90a kernels (the only users of these maps) can run.
#pragma once

#include <cstdint>
#include <atomic>
#include <mutex>
#include <type_traits>

#include <cuda.h>
#include <cuda_runtime_api.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

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

template <typename T>
constexpr CUtensorMapDataType tensor_map_type() {
  if constexpr (std::is_same_v<T, float>) return CU_TENSOR_MAP_DATA_TYPE_FLOAT32;
  return std::is_same_v<T, __nv_bfloat16> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                          : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
}

// A descriptor of the rank-`rank` tensor at `data` (16-byte aligned): dims[0] innermost,
// strides[i] the byte distance between consecutive indices of dimension i + 1 (multiples of
// 16), boxes of box[0..rank) elements with the 128-byte swizzle (box[0] * element size must
// be 128), element strides 1. Elements outside the tensor are read as zeros.
inline cudaError_t make_tensor_map(CUtensorMap* map, const void* data, CUtensorMapDataType type,
                                   uint32_t rank, const cuuint64_t* dims,
                                   const cuuint64_t* strides, const cuuint32_t* box) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) {
    return cudaErrorNotSupported;
  }
  const cuuint32_t element_strides[5] = {1, 1, 1, 1, 1};
  const CUresult result = encode(map, type, rank, const_cast<void*>(data), dims, strides, box,
                                 element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                 CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                 CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return result == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// A descriptor of the (outer, inner) matrix at `data` (16-byte aligned; ld * element_bytes a
// multiple of 16) loading boxes of (box_outer, box_inner) elements with the 128-byte swizzle
// (box_inner * element_bytes must be 128). Elements outside the matrix are read as zeros.
inline cudaError_t make_tensor_map_2d(CUtensorMap* map, const void* data,
                                      CUtensorMapDataType type, int element_bytes,
                                      uint64_t inner, uint64_t outer, uint64_t ld,
                                      uint32_t box_inner, uint32_t box_outer) {
  const cuuint64_t dims[2] = {inner, outer};
  const cuuint64_t strides[1] = {ld * static_cast<uint64_t>(element_bytes)};
  const cuuint32_t box[2] = {box_inner, box_outer};
  return make_tensor_map(map, data, type, 2, dims, strides, box);
}

// Whether `kernel`, an sm_90a kernel of this build, can run on `device`: compute capability
// 9.0, sm_90a machine code in the build (binaryVersion 90; TORCH_CUDA_ARCH_LIST must name 9.0a,
// not 9.0, for the wgmma code to be compiled in) and the driver's tensor-map encoder. The
// answer is cached per device in `known` (0 not yet known, 1 no, 2 yes; a race only computes
// it twice), one cache per kernel family.
inline bool sm90a_code_runs(const void* kernel, int device, std::atomic<int> (&known)[64]) {
  if (device < 0 || device >= 64) return false;
  int answer = known[device].load(std::memory_order_relaxed);
  if (answer == 0) {
    int major = 0, minor = 0;
    cudaFuncAttributes attributes{};
    const bool yes =
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) ==
            cudaSuccess &&
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) ==
            cudaSuccess &&
        major == 9 && minor == 0 && cudaFuncGetAttributes(&attributes, kernel) == cudaSuccess &&
        attributes.binaryVersion == 90 && tensor_map_encoder() != nullptr;
    answer = yes ? 2 : 1;
    known[device].store(answer, std::memory_order_relaxed);
  }
  return answer == 2;
}

}  // namespace fusedops
