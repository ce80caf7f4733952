// attention.h — plain C++ launchers of the flash-attention kernels, forward and backward.
//
// Torch-free: pointers, sizes, strides (in elements), the options and a stream.
// bindings.cpp checks the arguments, allocates the outputs and the scratch, and calls these.
// The semantics are python/fusedops/dispatch/attention_contract.py's (torch_ref.py is the
// executable reference, triton_kernels/attention.py the other kernel tier):
//
//   s_ij = q_i . k_j * scale over the keys j that query i sees (attention_mask.cuh),
//   lse_i = log sum_j exp(s_ij)   (natural log, float32; -inf when i sees no key),
//   out_i = sum_j exp(s_ij - lse_i) v_j   (0 when i sees no key).
//
// Layouts. Every q/k/v-shaped tensor is addressed as element (sequence b, row s, head h, d)
// at  data + b * batch_stride + s * row_stride + h * head_stride + d  (batched), or, packed
// (varlen), at  data + (cu_seqlens[b] + s) * row_stride + h * head_stride + d  with
// batch_stride unused. The last dimension is contiguous, every other stride is a multiple of
// 8 elements and the data is 16-byte aligned (bindings.cpp copies a tensor that is not).
// Query head h reads key/value head h / (heads_q / heads_kv).
//
// Packed sequences: cu_seqlens_q/k are int32 device arrays of batch + 1 offsets that the
// kernels never trust: each sequence is clamped to [0, total) (see clamp_sequence in
// attention_mask.cuh), so malformed offsets give unspecified rows but no out-of-bounds
// access. Offsets are 64-bit everywhere (a packed batch can pass 2**31 elements).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fusedops {

enum class AttentionType : int { kFloat16 = 0, kBFloat16 = 1 };

// Which kernels run: kAuto takes the sm_90a kernels on a compute-capability 9.0 device whose
// build has sm_90a code and for a head dim they cover (64, 128, 256), else the sm_80 ones.
enum class AttentionPath : int { kAuto = 0, kSm90 = 1, kSm80 = 2 };

constexpr int kAttentionUnbounded = 1 << 30;  // attention_contract.UNBOUNDED

struct AttentionTensor {
  void* data;             // 16-byte aligned; const for the inputs
  int64_t batch_stride;   // batched only
  int64_t row_stride;
  int64_t head_stride;
};

// What the forward and the backward share.
struct AttentionProblem {
  AttentionType type;
  int head_dim;           // one of 16, 32, 64, 96, 128, 256
  int batch;              // sequences: B, or len(cu_seqlens) - 1
  int heads_q, heads_kv;  // heads_q % heads_kv == 0
  int64_t seqlen_q;       // batched: Sq; packed: max_seqlen_q (an upper bound, for the grid)
  int64_t seqlen_k;       // batched: Sk; packed: max_seqlen_k
  const int32_t* cu_seqlens_q;  // packed: (batch + 1,) on the device; batched: nullptr
  const int32_t* cu_seqlens_k;
  int64_t total_q, total_k;     // packed: rows of q and of k/v (Tq, Tk); batched: unused
  float scale;
  int window_left, window_right;  // kAttentionUnbounded: no limit on that side
  AttentionTensor q, k, v;
};

// lse index of (b, h, s): batched (B, Hq, Sq) contiguous, packed (Hq, Tq) contiguous.

struct AttentionFwdParams {
  AttentionProblem problem;
  AttentionTensor out;    // like q (its own strides)
  float* lse;
};

struct AttentionBwdParams {
  AttentionProblem problem;
  AttentionTensor out, grad_out;          // like q
  const float* lse;
  AttentionTensor grad_q, grad_k, grad_v;  // like q, k, v; grad_k/grad_v sum over a group
  bool deterministic;     // bitwise reproducible: no floating-point atomics
  // Scratch that bindings.cpp allocates (attention_bwd_workspace gives the sizes):
  float* delta;           // like lse: rowsum(grad_out * out)
  float* grad_q_accum;    // float32 dQ accumulator indexed like a contiguous (B, Sq, Hq, D)
                          // (batched) or (Tq, Hq, D) (packed) tensor, ZEROED by the caller;
                          // unused (may be null) when deterministic
};

struct AttentionBwdWorkspace {
  int64_t delta_floats;         // like lse
  int64_t grad_q_accum_floats;  // 0 when deterministic
};
AttentionBwdWorkspace attention_bwd_workspace(const AttentionProblem& problem,
                                              bool deterministic);

// Whether the sm_90a kernels can run on `device` (compute capability 9.0 and sm_90a code).
bool attention_sm90_available(int device);

// Enqueue on `stream`. cudaErrorInvalidValue for arguments outside the documented ranges;
// cudaErrorNotSupported when `path` is kSm90 and the sm_90a kernels cannot run this call.
// Zero rows or keys launch nothing (bindings.cpp handles the empty cases).
cudaError_t attention_fwd(const AttentionFwdParams& params, AttentionPath path,
                          cudaStream_t stream);
cudaError_t attention_bwd(const AttentionBwdParams& params, AttentionPath path,
                          cudaStream_t stream);

// The kernels behind them (attention.cu chooses).
cudaError_t attention_fwd_sm80(const AttentionFwdParams& params, cudaStream_t stream);
cudaError_t attention_bwd_sm80(const AttentionBwdParams& params, cudaStream_t stream);
cudaError_t attention_fwd_sm90(const AttentionFwdParams& params, cudaStream_t stream);
cudaError_t attention_bwd_sm90(const AttentionBwdParams& params, cudaStream_t stream);
bool attention_fwd_sm90_covers(const AttentionProblem& problem);  // head dims, layout
bool attention_bwd_sm90_covers(const AttentionProblem& problem);

}  // namespace fusedops
