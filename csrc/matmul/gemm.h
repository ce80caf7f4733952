// gemm.h — plain C++ launchers of the tensor-core GEMM with a fused epilogue, and of the
// backward prologue of the fused linear.
//
// Torch-free: pointers, sizes, leading dimensions (in elements), a stream. bindings.cpp checks
// the arguments, allocates the outputs and calls these; the semantics are those of
// python/fusedops/dispatch/linear_contract.py.
//
// The GEMM computes, for 0 <= i < m, 0 <= j < n,
//
//     z[i, j]   = sum_k A(i, k) * B(j, k)            accumulated in float32
//     out[i, j] = act(z[i, j] + bias[j] + residual[i, j])
//
// (or, with `accumulate`, out[i, j] += z[i, j] into a float32 out), and can also store the
// pre-activation z + bias + residual. Each operand is stored either "K-major" (its rows are
// contiguous along k: A(i, k) = a[i * lda + k], which is how x and W are stored for the
// forward) or "MN-major" (contiguous along i or j: A(i, k) = a[k * lda + i]). The MN-major
// forms let the backward GEMMs read dz, W and x where they lie, with no transposed copy:
//
//     grad_input  (m, k_in) = dz @ W      A = dz  (K-major),  B = W  (MN-major)
//     grad_weight (n, k_in) = dz^T @ x    A = dz  (MN-major), B = x  (MN-major)
//
// Requirements on every operand (bindings.cpp makes an aligned copy otherwise): the
// contiguous dimension has stride 1, the leading dimension is a multiple of 8 elements
// (16 bytes of float32, so 4 would do, but one rule serves all types), and the base pointer
// is 16-byte aligned. These are TMA's rules (sm_90a) and cp.async's 16-byte
// copies (sm_80). m, n and k may be anything >= 1: ragged tiles are zero-filled on load
// (TMA bounds, cp.async zero-fill) and masked on store. m and n are below 2**31; offsets
// into any tensor are computed in 64 bits.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fusedops {

// kFloat32 multiplies in tf32 (10-bit mantissa products, float32 accumulation), the way
// torch does when torch.backends.cuda.matmul.allow_tf32 is set; its operands must both be
// K-major (tensor cores have no transposed tf32 shared-memory operand).
enum class GemmType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// The order matches linear_contract.ACTIVATIONS.
enum class Activation : int { kNone = 0, kRelu = 1, kGelu = 2, kGeluTanh = 3, kSilu = 4 };

// Which kernel runs: kAuto takes the sm_90a kernel on a compute-capability 9.0 device whose
// build has sm_90a code, else the sm_80 kernel (which also runs on an H100 when forced).
enum class GemmPath : int { kAuto = 0, kSm90 = 1, kSm80 = 2 };

struct GemmOperand {
  const void* data;  // 16-byte aligned
  int64_t ld;        // leading dimension in elements, a multiple of 8
  bool mn_major;     // false: element (row, k) at data[row * ld + k]; true: at data[k * ld + row]
};

struct GemmParams {
  int64_t m, n, k;            // m, n in [1, 2**31); k >= 1
  GemmType type;              // of A, B, residual, out (unless accumulate) and preact
  GemmOperand a;              // (m, k)
  GemmOperand b;              // (n, k)

  // The epilogue. Output-shaped tensors have column stride 1 and any leading dimension.
  const float* bias;          // (n,) float32, or nullptr
  const void* residual;       // (m, n), or nullptr
  int64_t ld_residual;
  Activation activation;
  void* out;                  // (m, n): `type`, or float32 when accumulate
  int64_t ld_out;
  bool accumulate;            // out += z (float32 out; bias, residual, activation unused)
  void* preact;               // (m, n) z + bias + residual before the activation, or nullptr
  int64_t ld_preact;
};

// Whether the sm_90a kernel can run on `device` (compute capability 9.0 and sm_90a code in
// this build).
bool gemm_sm90_available(int device);

// Enqueue the GEMM on `stream`. Returns cudaErrorInvalidValue for arguments outside the
// documented ranges, cudaErrorNotSupported when `path` is kSm90 and gemm_sm90_available is
// false, else the launch's error. *ran, when not null, receives the path that ran.
cudaError_t gemm(const GemmParams& params, GemmPath path, cudaStream_t stream,
                 GemmPath* ran = nullptr);

// The sm_80 (mma.sync) and sm_90a (wgmma) kernels, called by gemm(); exposed for tests.
cudaError_t gemm_sm80(const GemmParams& params, cudaStream_t stream);
cudaError_t gemm_sm90(const GemmParams& params, int device, cudaStream_t stream);

// The backward of the fused linear before its GEMMs: dz = grad_out * act'(saved) (saved is
// the pre-activation z, or for relu the output; unused for kNone), written to `dz` when it
// is not null, and the bias gradient sum_i dz[i, :], in float32, written to `grad_bias`
// (n floats) when it is not null. `partials` is float32 scratch of
// linear_bwd_prologue_partials_size(m, n) floats (unused without grad_bias): one partial sum
// per block of rows, then a second pass sums them in a fixed order, so the same inputs give
// bitwise the same gradient.
struct LinearBwdPrologueParams {
  int64_t m, n;
  GemmType type;              // of grad_out, saved and dz
  Activation activation;
  const void* grad_out;       // (m, n), column stride 1
  int64_t ld_grad_out;
  const void* saved;          // (m, n), column stride 1; unused for kNone
  int64_t ld_saved;
  void* dz;                   // (m, n), column stride 1, or nullptr
  int64_t ld_dz;
  float* grad_bias;           // (n,) float32, or nullptr
  float* partials;            // scratch for the bias reduction
};

int64_t linear_bwd_prologue_partials_size(int64_t m, int64_t n);
cudaError_t linear_bwd_prologue(const LinearBwdPrologueParams& params, cudaStream_t stream);

}  // namespace fusedops
