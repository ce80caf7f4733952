// bindings.cpp — the only torch-aware C++ in fusedops.
//
// For each CUDA op: check the arguments (a TORCH_CHECK naming the op, the argument and the
// rule, before any launch), allocate the outputs, guard the tensors' device, and call the
// torch-free launcher (csrc/<family>/*.h) on the current stream. The ops are registered with
// TORCH_LIBRARY under the schemas of python/fusedops/dispatch/contract.py (SCHEMAS); their
// fake (meta) implementations are Python, registered by fusedops.dispatch.cuda. A small
// pybind11 module exposes how this library was built (fusedops._C.build_info()).
//
// Nothing here synchronises with the host: sum(weight) for label smoothing stays on the
// device, and outputs are allocated with the caching allocator on the current stream, so the
// ops can be captured in a CUDA graph.

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

#include "cross_entropy/cross_entropy.h"

#define FUSEDOPS_STRINGIFY_(...) #__VA_ARGS__
#define FUSEDOPS_STRINGIFY(...) FUSEDOPS_STRINGIFY_(__VA_ARGS__)

// Set by the build (python/fusedops/_build_env.py): the -gencode targets, comma separated, and
// whether this is the ahead-of-time (setup.py) or the JIT (_extension.py) build.
#ifndef FUSEDOPS_ARCHS
#define FUSEDOPS_ARCHS unknown
#endif
#ifndef FUSEDOPS_BUILD_KIND
#define FUSEDOPS_BUILD_KIND unknown
#endif

namespace fusedops {
namespace {

// Outputs start as NaN when FUSEDOPS_POISON_OUTPUTS=1 (the test suite sets it; see
// contract.new_output), so an element a kernel forgets to write fails the comparison.
at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  const char* poison = std::getenv("FUSEDOPS_POISON_OUTPUTS");
  if (poison != nullptr && std::strcmp(poison, "1") == 0) {
    return at::full(shape, std::numeric_limits<double>::quiet_NaN(), options);
  }
  return at::empty(shape, options);
}

void check_same_cuda_device(const char* op, const char* name, const at::Tensor& t,
                            const at::Tensor& logits) {
  TORCH_CHECK(t.is_cuda() && t.device() == logits.device(), op, ": ", name,
              " must be on the logits' device ", logits.device(), ", got ", t.device());
}

void check_row_vector(const char* op, const char* name, const at::Tensor& t, int64_t rows,
                      const at::Tensor& logits) {
  check_same_cuda_device(op, name, t, logits);
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows, op, ": ", name, " must have shape (", rows,
              ",) (one per row of logits), got ", t.sizes());
}

// Checks what forward and backward share and fills the launcher's view of it.
// `weight_sum` receives the device tensor sum(weight) when the kernels need it.
CrossEntropyInputs check_inputs(const char* op, const at::Tensor& logits,
                                const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                double label_smoothing, double z_loss, double softcap,
                                at::Tensor& weight_sum) {
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor, got device ",
              logits.device());
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D (rows, classes), got shape ",
              logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": logits must be float32, float16 or bfloat16, got ", dtype);
  const int64_t rows = logits.size(0);
  const int64_t classes = logits.size(1);
  TORCH_CHECK(classes >= 1, op, ": logits must have at least one class, got shape ",
              logits.sizes());
  TORCH_CHECK(classes <= std::numeric_limits<int32_t>::max(), op,
              ": at most 2**31 - 1 classes are supported, got ", classes);
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), op,
              ": at most 2**31 - 1 rows are supported (one thread block per row), got ", rows);
  TORCH_CHECK(logits.stride(1) == 1 || classes == 1, op,
              ": the class dimension of logits must be contiguous (stride(1) == 1), got "
              "strides ",
              logits.strides());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(logits.data_ptr()) % logits.element_size() == 0, op,
              ": logits' data pointer must be aligned to its element size");

  check_same_cuda_device(op, "target", target, logits);
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt, op,
              ": target must be int64 or int32 class indices, got ", target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == rows, op, ": target must have shape (",
              rows, ",) for logits of shape ", logits.sizes(), ", got ", target.sizes());

  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(std::isfinite(z_loss) && z_loss >= 0.0, op,
              ": z_loss must be a finite float >= 0, got ", z_loss);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, op,
              ": softcap must be a finite float >= 0 (0 for none), got ", softcap);

  const float* weight_ptr = nullptr;
  const float* weight_sum_ptr = nullptr;
  if (weight.has_value()) {
    const at::Tensor& w = *weight;
    check_same_cuda_device(op, "weight", w, logits);
    TORCH_CHECK(w.scalar_type() == at::kFloat, op, ": weight must be float32, got ",
                w.scalar_type());
    TORCH_CHECK(w.dim() == 1 && w.size(0) == classes, op, ": weight must have shape (",
                classes, ",) (one per class), got ", w.sizes());
    TORCH_CHECK(w.is_contiguous(), op, ": weight must be contiguous");
    weight_ptr = w.data_ptr<float>();
    if (label_smoothing != 0.0) {
      weight_sum = w.sum();  // a one-element device tensor: no host sync
      weight_sum_ptr = weight_sum.data_ptr<float>();
    }
  }

  CrossEntropyInputs in{};
  in.logits = logits.data_ptr();
  in.logits_type = dtype == at::kFloat  ? LogitsType::kFloat32
                   : dtype == at::kHalf ? LogitsType::kFloat16
                                        : LogitsType::kBFloat16;
  in.rows = rows;
  in.classes = classes;
  in.logits_row_stride = logits.stride(0);
  in.target = target.data_ptr();
  in.target_type = target.scalar_type() == at::kLong ? IndexType::kInt64 : IndexType::kInt32;
  in.target_stride = target.stride(0);
  in.weight = weight_ptr;
  in.weight_sum = weight_sum_ptr;
  in.ignore_index = ignore_index;
  in.label_smoothing = static_cast<float>(label_smoothing);
  in.z_loss = static_cast<float>(z_loss);
  in.softcap = static_cast<float>(softcap);
  return in;
}

cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.get_device()).stream();
}

std::tuple<at::Tensor, at::Tensor> ce_fwd_cuda(const at::Tensor& logits, const at::Tensor& target,
                                               const std::optional<at::Tensor>& weight,
                                               int64_t ignore_index, double label_smoothing,
                                               double z_loss, double softcap) {
  constexpr const char* op = "fusedops::ce_fwd_cuda";
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor, got device ",
              logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor weight_sum;
  CrossEntropyFwdParams params{};
  params.in = check_inputs(op, logits, target, weight, ignore_index, label_smoothing, z_loss,
                           softcap, weight_sum);
  const auto options = logits.options().dtype(at::kFloat);
  at::Tensor loss = new_output({logits.size(0)}, options);
  at::Tensor lse = new_output({logits.size(0)}, options);
  params.loss = loss.data_ptr<float>();
  params.lse = lse.data_ptr<float>();
  C10_CUDA_CHECK(ce_fwd(params, current_stream(logits)));
  return {loss, lse};
}

// Checks the backward's arguments; the caller sets params.grad and params.grad_row_stride.
CrossEntropyBwdParams check_bwd(const char* op, const at::Tensor& logits,
                                const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                const at::Tensor& grad_loss, int64_t ignore_index,
                                double label_smoothing, double z_loss, double softcap,
                                at::Tensor& weight_sum) {
  CrossEntropyBwdParams params{};
  params.in = check_inputs(op, logits, target, weight, ignore_index, label_smoothing, z_loss,
                           softcap, weight_sum);
  const int64_t rows = logits.size(0);
  check_row_vector(op, "lse", lse, rows, logits);
  check_row_vector(op, "grad_loss", grad_loss, rows, logits);
  params.lse = lse.data_ptr<float>();
  params.lse_stride = lse.stride(0);
  params.grad_loss = grad_loss.data_ptr<float>();
  params.grad_loss_stride = grad_loss.stride(0);
  return params;
}

at::Tensor ce_bwd_cuda(const at::Tensor& logits, const at::Tensor& target,
                       const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                       const at::Tensor& grad_loss, int64_t ignore_index, double label_smoothing,
                       double z_loss, double softcap) {
  constexpr const char* op = "fusedops::ce_bwd_cuda";
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor, got device ",
              logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor weight_sum;
  CrossEntropyBwdParams params = check_bwd(op, logits, target, weight, lse, grad_loss,
                                           ignore_index, label_smoothing, z_loss, softcap,
                                           weight_sum);
  // A fresh contiguous (rows, classes) gradient: it never overlaps the logits.
  at::Tensor grad = new_output(logits.sizes(), logits.options());
  params.grad = grad.data_ptr();
  params.grad_row_stride = grad.stride(0);
  C10_CUDA_CHECK(ce_bwd(params, current_stream(logits)));
  return grad;
}

void ce_bwd_inplace_cuda(const at::Tensor& logits, const at::Tensor& target,
                         const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                         const at::Tensor& grad_loss, int64_t ignore_index,
                         double label_smoothing, double z_loss, double softcap) {
  constexpr const char* op = "fusedops::ce_bwd_inplace_cuda";
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor, got device ",
              logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor weight_sum;
  CrossEntropyBwdParams params = check_bwd(op, logits, target, weight, lse, grad_loss,
                                           ignore_index, label_smoothing, z_loss, softcap,
                                           weight_sum);
  // Each element is read and then overwritten by the same thread; rows that shared memory
  // would be written by two blocks.
  TORCH_CHECK(logits.size(0) <= 1 || logits.stride(0) >= logits.size(1), op,
              ": the in-place backward needs logits whose rows do not overlap (stride(0) >= "
              "size(1)), got shape ",
              logits.sizes(), " and strides ", logits.strides());
  params.grad = logits.data_ptr();
  params.grad_row_stride = logits.stride(0);
  C10_CUDA_CHECK(ce_bwd(params, current_stream(logits)));
}

pybind11::dict build_info() {
  pybind11::dict info;
  pybind11::list arches;
  std::string list = FUSEDOPS_STRINGIFY(FUSEDOPS_ARCHS);
  size_t start = 0;
  while (start <= list.size()) {
    const size_t comma = list.find(',', start);
    const size_t end = comma == std::string::npos ? list.size() : comma;
    if (end > start) arches.append(list.substr(start, end - start));
    start = end + 1;
  }
  info["arches"] = arches;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." +
                         std::to_string((CUDART_VERSION % 1000) / 10);
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." +
                          std::to_string(TORCH_VERSION_MINOR) + "." +
                          std::to_string(TORCH_VERSION_PATCH);
  info["build"] = FUSEDOPS_STRINGIFY(FUSEDOPS_BUILD_KIND);
  info["ops"] = pybind11::make_tuple("ce_fwd_cuda", "ce_bwd_cuda", "ce_bwd_inplace_cuda");
  return info;
}

}  // namespace
}  // namespace fusedops

// Schemas: keep identical to contract.SCHEMAS (op name + "_cuda").
TORCH_LIBRARY(fusedops, m) {
  m.def(
      "ce_fwd_cuda(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, float z_loss, float softcap) -> (Tensor, Tensor)");
  m.def(
      "ce_bwd_cuda(Tensor logits, Tensor target, Tensor? weight, Tensor lse, Tensor grad_loss, "
      "int ignore_index, float label_smoothing, float z_loss, float softcap) -> Tensor");
  m.def(
      "ce_bwd_inplace_cuda(Tensor(a!) logits, Tensor target, Tensor? weight, Tensor lse, "
      "Tensor grad_loss, int ignore_index, float label_smoothing, float z_loss, "
      "float softcap) -> ()");
}

TORCH_LIBRARY_IMPL(fusedops, CUDA, m) {
  m.impl("ce_fwd_cuda", &fusedops::ce_fwd_cuda);
  m.impl("ce_bwd_cuda", &fusedops::ce_bwd_cuda);
  m.impl("ce_bwd_inplace_cuda", &fusedops::ce_bwd_inplace_cuda);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedops CUDA kernels (the ops are torch.ops.fusedops.*_cuda)";
  m.def("build_info", &fusedops::build_info,
        "How this extension was built: arches, CUDA and torch versions, aot or jit.");
}
