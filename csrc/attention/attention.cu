// attention.cu — the attention launchers' entry points: the argument checks every kernel
// relies on, and the choice between the sm_90a kernels (TMA + wgmma, head dims 64 / 128 /
// 256) and the sm_80 ones (cp.async + mma.sync, every head dim; they also run on an H100).
#include <cstdint>

#include <cuda_runtime.h>

#include "attention.h"

namespace fusedops {
namespace {

bool head_dim_ok(int d) {
  return d == 16 || d == 32 || d == 64 || d == 96 || d == 128 || d == 256;
}

bool tensor_ok(const AttentionTensor& t, bool batched) {
  auto aligned = [](int64_t stride) { return stride % 8 == 0; };
  return t.data != nullptr && reinterpret_cast<uintptr_t>(t.data) % 16 == 0 &&
         aligned(t.row_stride) && aligned(t.head_stride) && (!batched || aligned(t.batch_stride));
}

bool problem_ok(const AttentionProblem& p) {
  if (p.type != AttentionType::kFloat16 && p.type != AttentionType::kBFloat16) return false;
  if (!head_dim_ok(p.head_dim) || p.batch < 1 || p.heads_q < 1 || p.heads_kv < 1 ||
      p.heads_q % p.heads_kv != 0 || p.batch > 65535 || p.heads_q > 65535) {
    return false;
  }
  if (p.seqlen_q < 1 || p.seqlen_k < 1 || p.seqlen_q > INT32_MAX || p.seqlen_k > INT32_MAX) {
    return false;
  }
  const bool packed = p.cu_seqlens_q != nullptr;
  if (packed != (p.cu_seqlens_k != nullptr)) return false;
  if (packed && (p.total_q < 0 || p.total_k < 0)) return false;
  // Windows: any int in [-2**30, 2**30] (negative sides hide keys; the mask helpers do the
  // arithmetic in 64 bits).
  if (p.window_left < -kAttentionUnbounded || p.window_left > kAttentionUnbounded ||
      p.window_right < -kAttentionUnbounded || p.window_right > kAttentionUnbounded) {
    return false;
  }
  return tensor_ok(p.q, !packed) && tensor_ok(p.k, !packed) && tensor_ok(p.v, !packed);
}

bool sm90_allowed(AttentionPath path, bool covers, int device, cudaError_t* error) {
  const bool available = attention_sm90_available(device) && covers;
  if (path == AttentionPath::kSm90 && !available) {
    *error = cudaErrorNotSupported;
    return false;
  }
  return path != AttentionPath::kSm80 && available;
}

}  // namespace

cudaError_t attention_fwd(const AttentionFwdParams& params, AttentionPath path,
                          cudaStream_t stream) {
  const bool packed = params.problem.cu_seqlens_q != nullptr;
  if (!problem_ok(params.problem) || !tensor_ok(params.out, !packed) || params.lse == nullptr) {
    return cudaErrorInvalidValue;
  }
  int device = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error != cudaSuccess) return error;
  error = cudaSuccess;
  const bool sm90 = sm90_allowed(path, attention_fwd_sm90_covers(params.problem), device, &error);
  if (error != cudaSuccess) return error;
  return sm90 ? attention_fwd_sm90(params, stream) : attention_fwd_sm80(params, stream);
}

cudaError_t attention_bwd(const AttentionBwdParams& params, AttentionPath path,
                          cudaStream_t stream) {
  const bool packed = params.problem.cu_seqlens_q != nullptr;
  if (!problem_ok(params.problem) || !tensor_ok(params.out, !packed) ||
      !tensor_ok(params.grad_out, !packed) || !tensor_ok(params.grad_q, !packed) ||
      !tensor_ok(params.grad_k, !packed) || !tensor_ok(params.grad_v, !packed) ||
      params.lse == nullptr || params.delta == nullptr ||
      (!params.deterministic && params.grad_q_accum == nullptr)) {
    return cudaErrorInvalidValue;
  }
  int device = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error != cudaSuccess) return error;
  error = cudaSuccess;
  // The sm_90a backward adds dQ with atomics: the deterministic backward is the sm_80 one.
  const bool covers = attention_bwd_sm90_covers(params.problem) && !params.deterministic;
  const bool sm90 = sm90_allowed(path, covers, device, &error);
  if (error != cudaSuccess) return error;
  return sm90 ? attention_bwd_sm90(params, stream) : attention_bwd_sm80(params, stream);
}

}  // namespace fusedops
