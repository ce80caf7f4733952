// conv_implicit_gemm_sm90.cu — placeholder until the sm_90a (wgmma) implicit GEMM lands: it
// covers nothing, so conv_implicit_gemm.cu always runs the sm_80 kernels.
#include <cuda_runtime.h>

#include "conv_implicit_gemm.h"

namespace fusedops {
namespace conv_gemm {

bool conv_sm90_runs(int device) {
  (void)device;
  return false;
}

bool conv_sm90_covers(ConvOp op, GemmType type) {
  (void)op;
  (void)type;
  return false;
}

cudaError_t conv_sm90_launch(ConvOp op, GemmType type, const ConvKernelParams& params,
                             int splits, cudaStream_t stream) {
  (void)op, (void)type, (void)params, (void)splits, (void)stream;
  return cudaErrorNotSupported;
}

}  // namespace conv_gemm
}  // namespace fusedops
