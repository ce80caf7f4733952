// cross_entropy.h — plain C++ launchers of the softmax-cross-entropy kernels.
//
// Torch-free: pointers, sizes, strides (in elements), the scalar options and a stream.
// bindings.cpp checks the arguments, allocates the outputs and calls these. The semantics
// are python/fusedops/dispatch/contract.py's (torch_ref.py is the executable reference).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fusedops {

enum class LogitsType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum class IndexType : int { kInt32 = 0, kInt64 = 1 };

// What the forward and the backward both read.
struct CrossEntropyInputs {
  const void* logits;         // (rows, classes), class stride 1, sizeof(T)-aligned
  LogitsType logits_type;
  int64_t rows;               // < 2**31 (one thread block per row)
  int64_t classes;            // in [1, 2**31)
  int64_t logits_row_stride;  // any value >= 0; rows may start at any alignment
  const void* target;         // (rows,) class indices
  IndexType target_type;
  int64_t target_stride;
  const float* weight;        // (classes,) contiguous, or nullptr for all ones
  const float* weight_sum;    // one float on the device, sum(weight); read only when
                              // weight != nullptr and label_smoothing != 0
  int64_t ignore_index;
  float label_smoothing;
  float z_loss;
  float softcap;              // 0: none
};

// loss[i] and lse[i] (contiguous float32, rows elements each), for every row.
struct CrossEntropyFwdParams {
  CrossEntropyInputs in;
  float* loss;
  float* lse;
};

// grad (rows, classes) of logits' type, class stride 1, row stride grad_row_stride. May be
// the logits themselves (in place: grad == logits and grad_row_stride == logits_row_stride,
// with rows that do not overlap); otherwise it must not overlap the logits.
struct CrossEntropyBwdParams {
  CrossEntropyInputs in;
  const float* lse;
  int64_t lse_stride;
  const float* grad_loss;
  int64_t grad_loss_stride;
  void* grad;
  int64_t grad_row_stride;
};

// Threads per block the launchers use for a row of `classes` elements of `element_size` bytes.
int ce_threads_per_block(int64_t classes, int element_size);

// Enqueue the kernel on `stream`; returns the launch's error (cudaSuccess, or
// cudaErrorInvalidValue for sizes outside the documented ranges). rows == 0 launches nothing.
cudaError_t ce_fwd(const CrossEntropyFwdParams& params, cudaStream_t stream);
cudaError_t ce_bwd(const CrossEntropyBwdParams& params, cudaStream_t stream);

}  // namespace fusedops
