// gemm.cu — the GEMM's entry point: argument checks shared by both kernels, and the choice
// between the sm_90a (wgmma + TMA) and the sm_80 (mma.sync + cp.async) kernel.
#include <cstdint>

#include <cuda_runtime.h>

#include "gemm.h"

namespace fusedops {
namespace {

constexpr int64_t kMaxExtent = (int64_t{1} << 31) - 1;

bool operand_ok(const GemmOperand& operand, int64_t rows, int64_t k) {
  if (operand.data == nullptr || operand.ld % 8 != 0 ||
      reinterpret_cast<uintptr_t>(operand.data) % 16 != 0) {
    return false;
  }
  // The contiguous extent must fit in a row: k for K-major, rows for MN-major.
  return operand.ld >= (operand.mn_major ? rows : k);
}

bool output_ok(const void* data, int64_t ld, int64_t n) { return data == nullptr || ld >= n; }

bool valid(const GemmParams& p) {
  if (p.m < 1 || p.n < 1 || p.k < 1 || p.m > kMaxExtent || p.n > kMaxExtent ||
      p.k > kMaxExtent) {
    return false;
  }
  if (p.type != GemmType::kFloat16 && p.type != GemmType::kBFloat16 &&
      p.type != GemmType::kFloat32) {
    return false;
  }
  if (p.type == GemmType::kFloat32 && (p.a.mn_major || p.b.mn_major)) return false;  // tf32
  if (!operand_ok(p.a, p.m, p.k) || !operand_ok(p.b, p.n, p.k)) return false;
  if (p.out == nullptr || !output_ok(p.out, p.ld_out, p.n) ||
      !output_ok(p.residual, p.ld_residual, p.n) || !output_ok(p.preact, p.ld_preact, p.n)) {
    return false;
  }
  if (p.accumulate && (p.bias != nullptr || p.residual != nullptr || p.preact != nullptr ||
                       p.activation != Activation::kNone)) {
    return false;
  }
  return static_cast<int>(p.activation) >= 0 && static_cast<int>(p.activation) <= 4;
}

}  // namespace

cudaError_t gemm(const GemmParams& params, GemmPath path, cudaStream_t stream, GemmPath* ran) {
  if (!valid(params)) {
    return cudaErrorInvalidValue;
  }
  int device = 0;
  const cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) {
    return status;
  }
  const bool sm90 = gemm_sm90_available(device);
  if (path == GemmPath::kSm90 && !sm90) {
    return cudaErrorNotSupported;
  }
  const GemmPath chosen = (path == GemmPath::kSm80 || !sm90) ? GemmPath::kSm80 : GemmPath::kSm90;
  if (ran != nullptr) {
    *ran = chosen;
  }
  return chosen == GemmPath::kSm90 ? gemm_sm90(params, device, stream)
                                   : gemm_sm80(params, stream);
}

}  // namespace fusedops
