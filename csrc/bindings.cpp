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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

#include "attention/attention.h"
#include "conv/conv.h"
#include "cross_entropy/cross_entropy.h"
#include "matmul/gemm.h"

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

// --- the fused linear (python/fusedops/dispatch/linear_contract.py) ----------------------

int64_t round_up8(int64_t x) { return (x + 7) / 8 * 8; }

// float32 only in tf32, and only when the caller allows it (torch's float32 matmul precision
// is not "highest"): the CUDA GEMM has no full-precision float32 path.
GemmType gemm_type(const char* op, const at::Tensor& t, bool allow_tf32) {
  if (t.scalar_type() == at::kFloat) {
    TORCH_CHECK(allow_tf32, op, ": float32 needs allow_tf32 (the CUDA GEMM multiplies float32 "
                "in tf32; torch.set_float32_matmul_precision('high') allows it)");
    return GemmType::kFloat32;
  }
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, op,
              ": the CUDA GEMM takes float16, bfloat16 and float32 (tf32), got ",
              t.scalar_type());
  return t.scalar_type() == at::kHalf ? GemmType::kFloat16 : GemmType::kBFloat16;
}

Activation parse_activation(const char* op, c10::string_view name) {
  if (name == "none") return Activation::kNone;
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "silu") return Activation::kSilu;
  TORCH_CHECK(false, op, ": unknown activation '", std::string(name),
              "' (none, relu, gelu, gelu_tanh, silu)");
}

bool saves_preactivation(Activation activation) {
  return activation == Activation::kGelu || activation == Activation::kGeluTanh ||
         activation == Activation::kSilu;
}

// The GEMM operand held by the 2-D `matrix`, whose dimension `row_dim` runs along M (or N)
// and whose other dimension runs along K. The kernels read either layout in place (K-major
// when K is the unit-stride dimension, MN-major when M/N is) provided the other stride is a
// multiple of 8 elements and the data 16-byte aligned; anything else — and any MN-major
// float32 operand, since tf32 tensor-core operands must be K-major — is first copied into a
// K-major, row-padded buffer (`storage` keeps it alive): the documented slower path.
GemmOperand gemm_operand(const at::Tensor& matrix, int row_dim, bool k_major_only,
                         at::Tensor& storage) {
  auto stride = [](const at::Tensor& t, int dim) {
    // A dimension of extent 1 is never stepped along: give it an aligned stride.
    return t.size(dim) == 1 ? round_up8(t.size(1 - dim)) : t.stride(dim);
  };
  auto usable = [&](const at::Tensor& t, int rows_dim, GemmOperand& operand) {
    if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
    for (const bool mn_major : {false, true}) {
      if (mn_major && k_major_only) break;
      const int unit_dim = mn_major ? rows_dim : 1 - rows_dim;
      const int64_t ld = stride(t, 1 - unit_dim);
      if (stride(t, unit_dim) == 1 && ld % 8 == 0 && ld >= t.size(unit_dim)) {
        operand = GemmOperand{t.data_ptr(), ld, mn_major};
        return true;
      }
    }
    return false;
  };
  GemmOperand operand{};
  if (usable(matrix, row_dim, operand)) return operand;
  const at::Tensor rows_by_k = row_dim == 0 ? matrix : matrix.t();
  storage = at::empty({rows_by_k.size(0), round_up8(rows_by_k.size(1))}, matrix.options())
                .narrow(1, 0, rows_by_k.size(1));
  storage.copy_(rows_by_k);
  TORCH_CHECK(usable(storage, 0, operand), "fusedops: internal error: unaligned GEMM copy");
  return operand;
}

// The float32 (N,) bias the epilogue reads, or an undefined tensor.
at::Tensor float_bias(const std::optional<at::Tensor>& bias) {
  return bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
}

// The kernel family an environment variable forces: "sm80" (mma.sync, runs on sm_90 too) or
// "sm90" (wgmma; an error where it cannot run); anything else lets the kernels choose.
GemmPath forced_path(const char* variable) {
  const char* value = std::getenv(variable);
  if (value != nullptr && std::strcmp(value, "sm80") == 0) return GemmPath::kSm80;
  if (value != nullptr && std::strcmp(value, "sm90") == 0) return GemmPath::kSm90;
  return GemmPath::kAuto;
}

void run_gemm(const char* op, const GemmParams& params, const at::Tensor& like) {
  const cudaError_t status = gemm(params, forced_path("FUSEDOPS_GEMM_PATH"), current_stream(like));
  TORCH_CHECK(status != cudaErrorNotSupported, op,
              ": FUSEDOPS_GEMM_PATH=sm90 but this device or build has no sm_90a GEMM");
  C10_CUDA_CHECK(status);
}

void check_linear_operands(const char* op, const at::Tensor& input, const at::Tensor& weight,
                           bool allow_tf32) {
  TORCH_CHECK(input.is_cuda(), op, ": input must be a CUDA tensor, got ", input.device());
  TORCH_CHECK(input.dim() == 2 && weight.dim() == 2, op,
              ": input and weight must be 2-D, got shapes ", input.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(weight.device() == input.device(), op, ": weight is on ", weight.device(),
              ", input on ", input.device());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), op, ": weight dtype ",
              weight.scalar_type(), " differs from the input's ", input.scalar_type());
  TORCH_CHECK(input.size(1) == weight.size(1), op, ": input (M, K) ", input.sizes(),
              " and weight (N, K) ", weight.sizes(), " disagree on K");
  TORCH_CHECK(input.size(0) < (int64_t{1} << 31) && weight.size(0) < (int64_t{1} << 31), op,
              ": M and N must be below 2**31");
  gemm_type(op, input, allow_tf32);
}

at::Tensor activate(const at::Tensor& z, Activation activation) {
  switch (activation) {
    case Activation::kRelu: return at::relu(z);
    case Activation::kGelu: return at::gelu(z);
    case Activation::kGeluTanh: return at::gelu(z, "tanh");
    case Activation::kSilu: return at::silu(z);
    default: return z;
  }
}

std::tuple<at::Tensor, at::Tensor> linear_fwd_cuda(const at::Tensor& input,
                                                   const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias,
                                                   const std::optional<at::Tensor>& residual,
                                                   c10::string_view activation_name,
                                                   bool allow_tf32) {
  constexpr const char* op = "fusedops::linear_fwd_cuda";
  check_linear_operands(op, input, weight, allow_tf32);
  const c10::cuda::CUDAGuard guard(input.device());
  const Activation activation = parse_activation(op, activation_name);
  const int64_t m = input.size(0), n = weight.size(0), k = input.size(1);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->device() == input.device(), op,
                ": bias must be (", n, ",) on ", input.device(), ", got ", bias->sizes());
  }
  if (residual.has_value()) {
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == m && residual->size(1) == n &&
                    residual->device() == input.device(),
                op, ": residual must be (", m, ", ", n, ") on ", input.device(), ", got ",
                residual->sizes());
  }
  const bool keep_preact = saves_preactivation(activation);
  at::Tensor out = new_output({m, n}, input.options());
  at::Tensor preact = new_output(keep_preact ? at::IntArrayRef{m, n} : at::IntArrayRef{0},
                                 input.options());
  if (m == 0 || n == 0) return {out, preact};
  if (k == 0) {  // no product: the epilogue alone, in float32 like the kernels
    at::Tensor z = at::zeros({m, n}, input.options().dtype(at::kFloat));
    if (bias.has_value()) z.add_(bias->to(at::kFloat));
    if (residual.has_value()) z.add_(residual->to(at::kFloat));
    out.copy_(activate(z, activation));
    if (keep_preact) preact.copy_(z);
    return {out, preact};
  }
  at::Tensor a_storage, b_storage;
  const at::Tensor bias_f32 = float_bias(bias);
  at::Tensor residual_t;
  if (residual.has_value()) {
    residual_t = *residual;
    if (residual_t.scalar_type() != input.scalar_type() || residual_t.stride(1) != 1) {
      residual_t = residual_t.to(input.scalar_type()).contiguous();
    }
  }
  GemmParams params{};
  params.m = m;
  params.n = n;
  params.k = k;
  params.type = gemm_type(op, input, allow_tf32);
  const bool k_major_only = params.type == GemmType::kFloat32;
  params.a = gemm_operand(input, 0, k_major_only, a_storage);
  params.b = gemm_operand(weight, 0, k_major_only, b_storage);
  params.bias = bias_f32.defined() ? bias_f32.data_ptr<float>() : nullptr;
  params.residual = residual_t.defined() ? residual_t.data_ptr() : nullptr;
  params.ld_residual = residual_t.defined() ? residual_t.stride(0) : 0;
  params.activation = activation;
  params.out = out.data_ptr();
  params.ld_out = n;
  params.preact = keep_preact ? preact.data_ptr() : nullptr;
  params.ld_preact = n;
  run_gemm(op, params, input);
  return {out, preact};
}

// dz = grad_out * act'(saved) (or grad_out itself) and, when asked, the float32 bias gradient.
at::Tensor form_dz(const char* op, const at::Tensor& grad_out, const at::Tensor& saved,
                   Activation activation, at::Tensor* grad_bias_f32) {
  const int64_t m = grad_out.size(0), n = grad_out.size(1);
  at::Tensor g = grad_out.stride(1) == 1 || n <= 1 ? grad_out : grad_out.contiguous();
  at::Tensor s;
  at::Tensor dz = g;
  if (activation != Activation::kNone) {
    s = saved.stride(1) == 1 || n <= 1 ? saved : saved.contiguous();
    dz = at::empty({m, n}, grad_out.options());
  }
  if (grad_bias_f32 != nullptr) *grad_bias_f32 = at::empty({n}, grad_out.options().dtype(at::kFloat));
  if (activation == Activation::kNone && grad_bias_f32 == nullptr) return dz;
  const int64_t partial_count = linear_bwd_prologue_partials_size(m, n);
  at::Tensor partials = at::empty({grad_bias_f32 != nullptr ? partial_count : 0},
                                  grad_out.options().dtype(at::kFloat));
  LinearBwdPrologueParams params{};
  params.m = m;
  params.n = n;
  params.type = grad_out.scalar_type() == at::kFloat ? GemmType::kFloat32
                                                      : gemm_type(op, grad_out, false);
  params.activation = activation;
  params.grad_out = g.data_ptr();
  params.ld_grad_out = g.stride(0);
  params.saved = s.defined() ? s.data_ptr() : nullptr;
  params.ld_saved = s.defined() ? s.stride(0) : 0;
  params.dz = activation != Activation::kNone ? dz.data_ptr() : nullptr;
  params.ld_dz = n;
  params.grad_bias = grad_bias_f32 != nullptr ? grad_bias_f32->data_ptr<float>() : nullptr;
  params.partials = grad_bias_f32 != nullptr ? partials.data_ptr<float>() : nullptr;
  C10_CUDA_CHECK(linear_bwd_prologue(params, current_stream(grad_out)));
  return dz;
}

// out (rows, cols) = A @ B^T with A, B given as matrices and the dimension of each that runs
// along the output (see gemm_operand); `out` has column stride 1.
void plain_gemm(const char* op, const at::Tensor& a, int a_row_dim, const at::Tensor& b,
                int b_row_dim, at::Tensor& out, bool accumulate, bool allow_tf32) {
  at::Tensor a_storage, b_storage;
  GemmParams params{};
  params.m = a.size(a_row_dim);
  params.n = b.size(b_row_dim);
  params.k = a.size(1 - a_row_dim);
  params.type = gemm_type(op, a, allow_tf32);
  const bool k_major_only = params.type == GemmType::kFloat32;
  params.a = gemm_operand(a, a_row_dim, k_major_only, a_storage);
  params.b = gemm_operand(b, b_row_dim, k_major_only, b_storage);
  params.activation = Activation::kNone;
  params.out = out.data_ptr();
  params.ld_out = out.stride(0);
  params.accumulate = accumulate;
  run_gemm(op, params, a);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& saved, c10::string_view activation_name, bool allow_tf32,
    bool needs_input_grad, bool needs_weight_grad, bool needs_bias_grad,
    bool needs_preact_grad) {
  constexpr const char* op = "fusedops::linear_bwd_cuda";
  check_linear_operands(op, input, weight, allow_tf32);
  const c10::cuda::CUDAGuard guard(input.device());
  const Activation activation = parse_activation(op, activation_name);
  const int64_t m = input.size(0), n = weight.size(0), k = input.size(1);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == m && grad_out.size(1) == n &&
                  grad_out.scalar_type() == input.scalar_type() &&
                  grad_out.device() == input.device(),
              op, ": grad_out must be (", m, ", ", n, ") ", input.scalar_type(), " on ",
              input.device(), ", got ", grad_out.sizes(), " ", grad_out.scalar_type());
  if (activation != Activation::kNone) {
    TORCH_CHECK(saved.sizes() == grad_out.sizes() && saved.scalar_type() == input.scalar_type() &&
                    saved.device() == input.device(),
                op, ": saved must be like grad_out for activation '", std::string(activation_name),
                "', got ", saved.sizes(), " ", saved.scalar_type());
  }
  auto empty = [&] { return at::empty({0}, input.options()); };
  at::Tensor grad_input = needs_input_grad ? new_output({m, k}, input.options()) : empty();
  at::Tensor grad_weight = needs_weight_grad ? new_output({n, k}, weight.options()) : empty();
  at::Tensor grad_bias = needs_bias_grad ? new_output({n}, weight.options()) : empty();
  at::Tensor grad_preact = needs_preact_grad ? new_output({m, n}, grad_out.options()) : empty();
  if (m == 0 || n == 0) {  // nothing flows: every gradient asked for is zero
    for (at::Tensor* t : {&grad_input, &grad_weight, &grad_bias, &grad_preact}) t->zero_();
    return {grad_input, grad_weight, grad_bias, grad_preact};
  }
  at::Tensor grad_bias_f32;
  const at::Tensor dz = form_dz(op, grad_out, saved, activation,
                                needs_bias_grad ? &grad_bias_f32 : nullptr);
  if (needs_bias_grad) grad_bias.copy_(grad_bias_f32);
  if (needs_preact_grad) grad_preact.copy_(dz);
  if (k > 0 && needs_input_grad) {  // (m, k) = dz (m, n) @ W (n, k)
    plain_gemm(op, dz, 0, weight, 1, grad_input, false, allow_tf32);
  }
  if (k > 0 && needs_weight_grad) {  // (n, k) = dz^T (n, m) @ x (m, k)
    plain_gemm(op, dz, 1, input, 1, grad_weight, false, allow_tf32);
  }
  return {grad_input, grad_weight, grad_bias, grad_preact};
}

void linear_weight_grad_accumulate_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                                        const at::Tensor& grad_weight,
                                        const std::optional<at::Tensor>& grad_bias,
                                        bool allow_tf32) {
  constexpr const char* op = "fusedops::linear_weight_grad_accumulate_cuda";
  TORCH_CHECK(input.is_cuda() && input.dim() == 2 && grad_out.dim() == 2 &&
                  grad_out.size(0) == input.size(0) && grad_out.device() == input.device() &&
                  grad_out.scalar_type() == input.scalar_type(),
              op, ": grad_out (M, N) and input (M, K) must share M, dtype and device, got ",
              grad_out.sizes(), " and ", input.sizes());
  const int64_t m = input.size(0), n = grad_out.size(1), k = input.size(1);
  TORCH_CHECK(grad_weight.scalar_type() == at::kFloat && grad_weight.dim() == 2 &&
                  grad_weight.size(0) == n && grad_weight.size(1) == k &&
                  grad_weight.device() == input.device(),
              op, ": grad_weight must be float32 (", n, ", ", k, "), got ", grad_weight.sizes(),
              " ", grad_weight.scalar_type());
  if (grad_bias.has_value()) {
    TORCH_CHECK(grad_bias->scalar_type() == at::kFloat && grad_bias->dim() == 1 &&
                    grad_bias->size(0) == n && grad_bias->device() == input.device(),
                op, ": grad_bias must be float32 (", n, ",), got ", grad_bias->sizes());
  }
  gemm_type(op, input, allow_tf32);
  const c10::cuda::CUDAGuard guard(input.device());
  if (m == 0 || n == 0) return;
  if (grad_bias.has_value()) {
    at::Tensor sums;
    form_dz(op, grad_out, grad_out, Activation::kNone, &sums);
    grad_bias->add_(sums);
  }
  if (k == 0) return;
  if (grad_weight.stride(1) == 1) {
    at::Tensor target = grad_weight;
    plain_gemm(op, grad_out, 1, input, 1, target, true, allow_tf32);
  } else {  // the kernels add into rows with unit column stride: go through a temporary
    at::Tensor sum = at::zeros({n, k}, grad_weight.options());
    plain_gemm(op, grad_out, 1, input, 1, sum, true, allow_tf32);
    grad_weight.add_(sum);
  }
}

// --- attention (python/fusedops/dispatch/attention_contract.py) --------------------------

// `t` filled with NaN when FUSEDOPS_POISON_OUTPUTS=1, as new_output does.
at::Tensor poisoned(at::Tensor t) {
  const char* poison = std::getenv("FUSEDOPS_POISON_OUTPUTS");
  if (poison != nullptr && std::strcmp(poison, "1") == 0) {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return t;
}

// A tensor shaped like `like`, laid out like it (empty_like), NaN-poisoned like new_output.
at::Tensor new_output_like(const at::Tensor& like) { return poisoned(at::empty_like(like)); }

// The kernels read (batch, row, head, d) with d contiguous, every other stride a multiple of
// 8 elements and the data 16-byte aligned; anything else is copied to a dense tensor first.
at::Tensor attention_aligned(const at::Tensor& t) {
  bool ok = t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t dim = 0; dim + 1 < t.dim(); ++dim) {
    ok = ok && (t.size(dim) == 1 || t.stride(dim) % 8 == 0);
  }
  return ok ? t : at::empty(t.sizes(), t.options()).copy_(t);
}

// (batch, row, head) strides of a batched (B, H, S, D) or packed (T, H, D) tensor; a dimension
// of extent 1 gets an aligned stride (it is never stepped along).
AttentionTensor attention_tensor(const at::Tensor& t, bool packed) {
  auto stride = [&](int64_t dim) { return t.size(dim) == 1 ? int64_t{0} : t.stride(dim); };
  if (packed) return AttentionTensor{t.data_ptr(), 0, stride(0), stride(1)};
  return AttentionTensor{t.data_ptr(), stride(0), stride(2), stride(1)};
}

AttentionPath attention_path() {
  const char* env = std::getenv("FUSEDOPS_ATTENTION_PATH");  // "sm80" forces mma.sync
  if (env != nullptr && std::strcmp(env, "sm80") == 0) return AttentionPath::kSm80;
  if (env != nullptr && std::strcmp(env, "sm90") == 0) return AttentionPath::kSm90;
  return AttentionPath::kAuto;
}

// cudaErrorNotSupported: either FUSEDOPS_ATTENTION_PATH=sm90 asked for kernels that cannot run
// this call, or the sm_80 kernels' tiles for this head dim need more shared memory per block
// than this GPU has (D = 128 / 256 on 99 KB consumer GPUs).
void check_attention_status(const char* op, cudaError_t status, AttentionPath path) {
  if (status == cudaErrorNotSupported) {
    (void)cudaGetLastError();
    TORCH_CHECK(path != AttentionPath::kSm90, op,
                ": FUSEDOPS_ATTENTION_PATH=sm90 but the sm_90a kernels cannot run this call "
                "(they need an sm_90a build on a compute capability 9.0 GPU and head dim 64, "
                "128 or 256; the backward 64 or 128 and not deterministic)");
    TORCH_CHECK(false, op, ": this GPU has too little shared memory per block for the CUDA "
                "attention kernels at this head dim (use the Triton tier)");
  }
  C10_CUDA_CHECK(status);
}

int clamp_window(int64_t side) {
  return static_cast<int>(std::max<int64_t>(-kAttentionUnbounded,
                                            std::min<int64_t>(side, kAttentionUnbounded)));
}

// The problem of q, k, v (already aligned), or nothing to compute (no rows or no keys).
struct AttentionCall {
  AttentionProblem problem{};
  bool no_rows = false;   // nothing to write but empty outputs
  bool no_keys = false;   // every row sees no key: out 0, lse -inf
};

AttentionCall attention_call(const char* op, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v,
                             const std::optional<at::Tensor>& cu_seqlens_q,
                             const std::optional<at::Tensor>& cu_seqlens_k,
                             int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
                             int64_t window_left, int64_t window_right) {
  TORCH_CHECK(q.is_cuda() && k.device() == q.device() && v.device() == q.device(), op,
              ": q, k and v must be on one CUDA device");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": the CUDA attention kernels take float16 and bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must share a dtype");
  const bool packed = cu_seqlens_q.has_value();
  TORCH_CHECK(packed == cu_seqlens_k.has_value(), op,
              ": cu_seqlens_q and cu_seqlens_k come together");
  TORCH_CHECK(q.dim() == (packed ? 3 : 4) && k.dim() == q.dim() && v.dim() == q.dim(), op,
              ": q, k, v must be ", packed ? "(T, H, D)" : "(B, H, S, D)", ", got ", q.sizes());
  const int64_t d = q.size(-1);
  TORCH_CHECK(d == 16 || d == 32 || d == 64 || d == 96 || d == 128 || d == 256, op,
              ": head dim ", d, " (the CUDA kernels take 16, 32, 64, 96, 128, 256)");
  TORCH_CHECK(k.size(-1) == d && v.size(-1) == d, op, ": q, k, v must share the head dim");
  const int64_t heads_q = q.size(1), heads_kv = k.size(1);
  TORCH_CHECK(heads_kv > 0 && heads_q % heads_kv == 0 && v.size(1) == heads_kv, op,
              ": query heads ", heads_q, " must be a multiple of key/value heads ", heads_kv);
  TORCH_CHECK(heads_q <= 65535, op, ": at most 65535 heads, got ", heads_q);
  AttentionCall call;
  AttentionProblem& p = call.problem;
  p.type = q.scalar_type() == at::kHalf ? AttentionType::kFloat16 : AttentionType::kBFloat16;
  p.head_dim = static_cast<int>(d);
  p.heads_q = static_cast<int>(heads_q);
  p.heads_kv = static_cast<int>(heads_kv);
  p.scale = static_cast<float>(scale);
  p.window_left = clamp_window(window_left);
  p.window_right = clamp_window(window_right);
  if (packed) {
    for (const at::Tensor* cu : {&*cu_seqlens_q, &*cu_seqlens_k}) {
      TORCH_CHECK(cu->scalar_type() == at::kInt && cu->dim() == 1 && cu->is_contiguous() &&
                      cu->device() == q.device() && cu->size(0) >= 1,
                  op, ": cu_seqlens must be contiguous int32 (batch + 1,) on q's device");
    }
    TORCH_CHECK(cu_seqlens_k->size(0) == cu_seqlens_q->size(0), op,
                ": cu_seqlens_q and cu_seqlens_k must have the same length");
    const int64_t batch = cu_seqlens_q->size(0) - 1;
    TORCH_CHECK(batch <= 65535, op, ": at most 65535 sequences, got ", batch);
    p.batch = static_cast<int>(batch);
    p.cu_seqlens_q = cu_seqlens_q->data_ptr<int32_t>();
    p.cu_seqlens_k = cu_seqlens_k->data_ptr<int32_t>();
    p.total_q = q.size(0);
    p.total_k = k.size(0);
    p.seqlen_q = std::min<int64_t>(max_seqlen_q, q.size(0));
    p.seqlen_k = std::min<int64_t>(max_seqlen_k, k.size(0));
    call.no_rows = batch == 0 || q.size(0) == 0 || heads_q == 0 || p.seqlen_q <= 0;
  } else {
    TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && v.size(2) == k.size(2), op,
                ": q, k, v disagree on batch or key length");
    TORCH_CHECK(q.size(0) <= 65535, op, ": at most 65535 sequences, got ", q.size(0));
    p.batch = static_cast<int>(q.size(0));
    p.seqlen_q = q.size(2);
    p.seqlen_k = k.size(2);
    call.no_rows = p.batch == 0 || heads_q == 0 || p.seqlen_q == 0;
  }
  TORCH_CHECK(p.seqlen_q < (int64_t{1} << 31) && p.seqlen_k < (int64_t{1} << 31), op,
              ": sequences must be shorter than 2**31");
  call.no_keys = !call.no_rows && p.seqlen_k <= 0;
  p.q = attention_tensor(q, packed);
  p.k = attention_tensor(k, packed);
  p.v = attention_tensor(v, packed);
  return call;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t window_left,
    int64_t window_right, bool allow_tf32) {
  constexpr const char* op = "fusedops::attention_fwd_cuda";
  TORCH_CHECK(q_in.is_cuda(), op, ": q must be a CUDA tensor, got ", q_in.device());
  const c10::cuda::CUDAGuard guard(q_in.device());
  const bool packed = cu_seqlens_q.has_value();
  const at::Tensor q = attention_aligned(q_in), k = attention_aligned(k_in),
                   v = attention_aligned(v_in);
  AttentionCall call = attention_call(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                      max_seqlen_k, scale, window_left, window_right);
  at::Tensor out = new_output_like(q_in);
  const auto lse_shape = packed ? std::vector<int64_t>{q_in.size(1), q_in.size(0)}
                                : std::vector<int64_t>{q_in.size(0), q_in.size(1), q_in.size(2)};
  at::Tensor lse = new_output(lse_shape, q_in.options().dtype(at::kFloat));
  if (call.no_rows || call.no_keys) {
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  at::Tensor out_kernel = attention_aligned(out);  // out itself unless empty_like misaligned
  AttentionFwdParams params{};
  params.problem = call.problem;
  params.out = attention_tensor(out_kernel, packed);
  params.lse = lse.data_ptr<float>();
  const AttentionPath path = attention_path();
  check_attention_status(op, attention_fwd(params, path, current_stream(q)), path);
  if (!out_kernel.is_same(out)) out.copy_(out_kernel);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t window_left,
    int64_t window_right, bool allow_tf32, bool deterministic) {
  constexpr const char* op = "fusedops::attention_bwd_cuda";
  TORCH_CHECK(q_in.is_cuda(), op, ": q must be a CUDA tensor, got ", q_in.device());
  const c10::cuda::CUDAGuard guard(q_in.device());
  const bool packed = cu_seqlens_q.has_value();
  const at::Tensor q = attention_aligned(q_in), k = attention_aligned(k_in),
                   v = attention_aligned(v_in), out = attention_aligned(out_in),
                   grad_out = attention_aligned(grad_out_in);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() &&
                  grad_out.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              op, ": grad_out and out must be shaped like q, in q's dtype");
  const auto lse_shape = packed ? std::vector<int64_t>{q.size(1), q.size(0)}
                                : std::vector<int64_t>{q.size(0), q.size(1), q.size(2)};
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.sizes() == at::IntArrayRef(lse_shape) &&
                  lse.is_contiguous() && lse.device() == q.device(),
              op, ": lse must be contiguous float32 ", at::IntArrayRef(lse_shape));
  AttentionCall call = attention_call(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                      max_seqlen_k, scale, window_left, window_right);
  at::Tensor grad_q = new_output_like(q_in), grad_k = new_output_like(k_in),
             grad_v = new_output_like(v_in);
  if (call.no_rows || call.no_keys) {  // nothing flows
    grad_q.zero_();
    grad_k.zero_();
    grad_v.zero_();
    return {grad_q, grad_k, grad_v};
  }
  at::Tensor gq = attention_aligned(grad_q), gk = attention_aligned(grad_k),
             gv = attention_aligned(grad_v);
  const AttentionBwdWorkspace sizes = attention_bwd_workspace(call.problem, deterministic);
  const auto float_options = q.options().dtype(at::kFloat);
  at::Tensor delta = at::empty({sizes.delta_floats}, float_options);
  at::Tensor grad_q_accum = at::zeros({sizes.grad_q_accum_floats}, float_options);
  AttentionBwdParams params{};
  params.problem = call.problem;
  params.out = attention_tensor(out, packed);
  params.grad_out = attention_tensor(grad_out, packed);
  params.lse = lse.data_ptr<float>();
  params.grad_q = attention_tensor(gq, packed);
  params.grad_k = attention_tensor(gk, packed);
  params.grad_v = attention_tensor(gv, packed);
  params.deterministic = deterministic;
  params.delta = delta.data_ptr<float>();
  params.grad_q_accum = sizes.grad_q_accum_floats > 0 ? grad_q_accum.data_ptr<float>() : nullptr;
  const AttentionPath path = attention_path();
  check_attention_status(op, attention_bwd(params, path, current_stream(q)), path);
  if (!gq.is_same(grad_q)) grad_q.copy_(gq);
  if (!gk.is_same(grad_k)) grad_k.copy_(gk);
  if (!gv.is_same(grad_v)) grad_v.copy_(gv);
  return {grad_q, grad_k, grad_v};
}

// --- convolution (python/fusedops/dispatch/conv_contract.py) ------------------------------
//
// The kernels read dense NHWC activations and KRSC weights, with the implicit-GEMM kernels'
// channel counts padded to multiples of 8 (zeros): the conversions below are the price of any
// other layout or channel count (a channels_last input with C % 8 == 0 costs none).

// (N, C, H, W) -> a dense (N, H, W, channels) tensor whose first `C` channels are `t`'s and the
// rest zero (no copy when `t` is already dense channels_last and channels == C).
at::Tensor nhwc(const at::Tensor& t, int64_t channels) {
  const at::Tensor view = t.permute({0, 2, 3, 1});
  if (channels == t.size(1) && view.is_contiguous()) return view;
  at::Tensor dense = channels == t.size(1)
                         ? at::empty(view.sizes(), t.options())
                         : at::zeros({view.size(0), view.size(1), view.size(2), channels},
                                     t.options());
  dense.narrow(3, 0, t.size(1)).copy_(view);
  return dense;
}

// (K, C, R, S) -> dense (k_rows, R, S, c_cols), zero-padded.
at::Tensor krsc(const at::Tensor& w, int64_t k_rows, int64_t c_cols) {
  at::Tensor dense = at::zeros({k_rows, w.size(2), w.size(3), c_cols}, w.options());
  dense.narrow(0, 0, w.size(0)).narrow(3, 0, w.size(1)).copy_(w.permute({0, 2, 3, 1}));
  return dense;
}

ConvGeometry conv_geometry(const at::Tensor& input, int64_t in_channels, int64_t out_channels,
                           const at::Tensor& weight, int64_t stride_h, int64_t stride_w,
                           int64_t pad_h, int64_t pad_w, int64_t dilation_h,
                           int64_t dilation_w, int64_t out_h, int64_t out_w) {
  ConvGeometry g{};
  g.batch = input.size(0);
  g.in_h = input.size(2);
  g.in_w = input.size(3);
  g.in_channels = in_channels;
  g.out_channels = out_channels;
  g.kernel_h = static_cast<int>(weight.size(2));
  g.kernel_w = static_cast<int>(weight.size(3));
  g.out_h = out_h;
  g.out_w = out_w;
  g.stride_h = static_cast<int>(stride_h);
  g.stride_w = static_cast<int>(stride_w);
  g.pad_h = static_cast<int>(pad_h);
  g.pad_w = static_cast<int>(pad_w);
  g.dilation_h = static_cast<int>(dilation_h);
  g.dilation_w = static_cast<int>(dilation_w);
  return g;
}

// float32: the depthwise kernel computes it exactly; the implicit GEMM only in tf32, so only
// where the caller allows tf32 (torch.backends.cudnn.allow_tf32, as for cuDNN's convs): it
// has no full-precision float32 path, and the op says so rather than round silently.
GemmType conv_type(const char* op, const at::Tensor& input, bool depthwise, bool allow_tf32) {
  if (input.scalar_type() == at::kFloat) {
    TORCH_CHECK_NOT_IMPLEMENTED(
        depthwise || allow_tf32, op,
        ": float32 needs allow_tf32 (the CUDA implicit-GEMM convolution multiplies float32 in "
        "tf32; torch.backends.cudnn.allow_tf32 = True allows it, else float32 runs on the "
        "Triton or torch tier)");
    return GemmType::kFloat32;
  }
  TORCH_CHECK(input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16, op,
              ": the CUDA convolution takes float16, bfloat16 and float32 (tf32; exact "
              "depthwise), got ", input.scalar_type());
  return input.scalar_type() == at::kHalf ? GemmType::kFloat16 : GemmType::kBFloat16;
}

void check_conv(const char* op, const at::Tensor& input, const at::Tensor& weight,
                int64_t groups) {
  TORCH_CHECK(input.is_cuda() && weight.device() == input.device(), op,
              ": input and weight must be on one CUDA device");
  TORCH_CHECK(input.dim() == 4 && weight.dim() == 4, op, ": input (N, C, H, W) and weight "
              "(K, C / groups, R, S) must be 4-D");
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), op, ": weight dtype ",
              weight.scalar_type(), " differs from the input's ", input.scalar_type());
  const bool depthwise = groups != 1;
  TORCH_CHECK(!depthwise || (groups == input.size(1) && weight.size(1) == 1 &&
                             weight.size(0) % groups == 0),
              op, ": groups must be 1 or the input channels (depthwise), got ", groups);
  TORCH_CHECK(depthwise || weight.size(1) == input.size(1), op, ": weight (K, C, R, S) ",
              weight.sizes(), " and input ", input.sizes(), " disagree on C");
}

// An (N, K, P, Q) output in the asked layout and the dense NHWC (N, P, Q, k_pad) buffer the
// kernels write: the output's own storage when it is channels_last and k_pad == K (no copy
// afterwards), else a separate buffer that finish_nhwc copies over.
struct NhwcOutput {
  at::Tensor out;
  at::Tensor buffer;
};

NhwcOutput nhwc_output(const at::TensorOptions& options, int64_t batch, int64_t channels,
                       int64_t padded, int64_t height, int64_t width, bool channels_last) {
  at::Tensor out = poisoned(at::empty({batch, channels, height, width},
                                      options.memory_format(
                                          channels_last ? at::MemoryFormat::ChannelsLast
                                                        : at::MemoryFormat::Contiguous)));
  if (channels_last && padded == channels) return {out, out.permute({0, 2, 3, 1})};
  return {out, at::empty({batch, height, width, padded}, options)};
}

// The implicit-GEMM convolution's status: FUSEDOPS_CONV_PATH=sm90 where no sm_90a kernel
// covers the call is the caller's error, anything else a CUDA one.
void check_conv_status(const char* op, cudaError_t status) {
  TORCH_CHECK(status != cudaErrorNotSupported, op,
              ": FUSEDOPS_CONV_PATH=sm90 but this device or build has no sm_90a convolution "
              "kernel for this call");
  C10_CUDA_CHECK(status);
}

void finish_nhwc(NhwcOutput& target) {
  if (target.buffer.data_ptr() == target.out.data_ptr()) return;
  target.out.copy_(target.buffer.narrow(3, 0, target.out.size(1)).permute({0, 3, 1, 2}));
}

std::tuple<at::Tensor, at::Tensor> conv2d_fwd_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, int64_t stride_h, int64_t stride_w,
    int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t out_h,
    int64_t out_w, int64_t groups, c10::string_view activation_name, bool out_channels_last,
    bool allow_tf32) {
  constexpr const char* op = "fusedops::conv2d_fwd_cuda";
  check_conv(op, input, weight, groups);
  const c10::cuda::CUDAGuard guard(input.device());
  const bool depthwise = groups != 1;
  const GemmType type = conv_type(op, input, depthwise, allow_tf32);
  const Activation activation = parse_activation(op, activation_name);
  const bool keep_preact = saves_preactivation(activation);
  const int64_t channels = input.size(1), features = weight.size(0);
  const int64_t c_pad = depthwise ? channels : round_up8(channels);
  const int64_t k_pad = depthwise ? features : round_up8(features);
  const auto options = input.options();
  if (input.size(0) == 0 || features == 0 || out_h == 0 || out_w == 0) {
    auto empty_out = [&] {
      return nhwc_output(options, input.size(0), features, k_pad, out_h, out_w,
                         out_channels_last).out;
    };
    return {empty_out(), keep_preact ? empty_out() : at::empty({0}, options)};
  }
  const at::Tensor x = nhwc(input, c_pad);
  at::Tensor bias_f32;
  if (bias.has_value()) {
    bias_f32 = at::zeros({k_pad}, options.dtype(at::kFloat));
    bias_f32.narrow(0, 0, features).copy_(*bias);
  }
  at::Tensor residual_nhwc;
  if (residual.has_value()) residual_nhwc = nhwc(residual->to(input.scalar_type()), k_pad);
  NhwcOutput out = nhwc_output(options, input.size(0), features, k_pad, out_h, out_w,
                               out_channels_last);
  NhwcOutput preact;
  if (keep_preact) {
    preact = nhwc_output(options, input.size(0), features, k_pad, out_h, out_w,
                         out_channels_last);
  }
  const ConvGeometry geometry = conv_geometry(input, c_pad, k_pad, weight, stride_h, stride_w,
                                              pad_h, pad_w, dilation_h, dilation_w, out_h,
                                              out_w);
  if (depthwise) {
    const at::Tensor w = weight.reshape({features, weight.size(2), weight.size(3)}).contiguous();
    DepthwiseFwdParams params{geometry, type, x.data_ptr(), w.data_ptr(),
                              bias_f32.defined() ? bias_f32.data_ptr<float>() : nullptr,
                              residual_nhwc.defined() ? residual_nhwc.data_ptr() : nullptr,
                              activation, out.buffer.data_ptr(),
                              keep_preact ? preact.buffer.data_ptr() : nullptr};
    C10_CUDA_CHECK(depthwise_fwd(params, current_stream(input)));
  } else {
    const at::Tensor w = krsc(weight, k_pad, c_pad);
    ConvFwdParams params{geometry, type, x.data_ptr(), w.data_ptr(),
                         bias_f32.defined() ? bias_f32.data_ptr<float>() : nullptr,
                         residual_nhwc.defined() ? residual_nhwc.data_ptr() : nullptr,
                         activation, out.buffer.data_ptr(),
                         keep_preact ? preact.buffer.data_ptr() : nullptr};
    check_conv_status(op, conv_fwd(params, forced_path("FUSEDOPS_CONV_PATH"),
                                    current_stream(input)));
  }
  finish_nhwc(out);
  if (!keep_preact) return {out.out, at::empty({0}, options)};
  finish_nhwc(preact);
  return {out.out, preact.out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv2d_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& saved, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
    int64_t dilation_h, int64_t dilation_w, int64_t out_h, int64_t out_w, int64_t groups,
    c10::string_view activation_name, bool allow_tf32, bool needs_input_grad,
    bool needs_weight_grad, bool needs_bias_grad, bool needs_preact_grad) {
  constexpr const char* op = "fusedops::conv2d_bwd_cuda";
  check_conv(op, input, weight, groups);
  const c10::cuda::CUDAGuard guard(input.device());
  const bool depthwise = groups != 1;
  const GemmType type = conv_type(op, input, depthwise, allow_tf32);
  const Activation activation = parse_activation(op, activation_name);
  const int64_t batch = input.size(0), channels = input.size(1), features = weight.size(0);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == batch && grad_out.size(1) == features &&
                  grad_out.size(2) == out_h && grad_out.size(3) == out_w &&
                  grad_out.scalar_type() == input.scalar_type(),
              op, ": grad_out must be (N, K, out_h, out_w) in the input's dtype, got ",
              grad_out.sizes());
  const auto options = input.options();
  auto empty = [&] { return at::empty({0}, options); };
  at::Tensor grad_input = needs_input_grad ? new_output_like(input) : empty();
  at::Tensor grad_weight = needs_weight_grad ? new_output_like(weight) : empty();
  at::Tensor grad_bias = needs_bias_grad ? new_output({features}, weight.options()) : empty();
  at::Tensor grad_preact = needs_preact_grad ? new_output_like(grad_out) : empty();
  const int64_t pixels = batch * out_h * out_w;
  if (pixels == 0 || features == 0 || channels == 0) {
    for (at::Tensor* t : {&grad_input, &grad_weight, &grad_bias, &grad_preact}) t->zero_();
    return {grad_input, grad_weight, grad_bias, grad_preact};
  }
  const int64_t c_pad = depthwise ? channels : round_up8(channels);
  const int64_t k_pad = depthwise ? features : round_up8(features);
  // dz = grad_out * act'(saved) on the (N*P*Q, K) view, into a zero-padded (.., k_pad) buffer,
  // with the bias gradient from the same pass.
  const at::Tensor g = nhwc(grad_out, features).reshape({pixels, features});
  const at::Tensor s = activation == Activation::kNone
                           ? g
                           : nhwc(saved, features).reshape({pixels, features});
  at::Tensor dz = k_pad == features && activation == Activation::kNone
                      ? g
                      : at::zeros({pixels, k_pad}, options);
  at::Tensor grad_bias_f32 = needs_bias_grad ? at::empty({features}, options.dtype(at::kFloat))
                                             : at::Tensor();
  if (activation != Activation::kNone || dz.data_ptr() != g.data_ptr() || needs_bias_grad) {
    at::Tensor partials = at::empty({needs_bias_grad
                                         ? linear_bwd_prologue_partials_size(pixels, features)
                                         : 0},
                                    options.dtype(at::kFloat));
    LinearBwdPrologueParams params{};
    params.m = pixels;
    params.n = features;
    params.type = type;
    params.activation = activation;
    params.grad_out = g.data_ptr();
    params.ld_grad_out = features;
    params.saved = s.data_ptr();
    params.ld_saved = features;
    params.dz = dz.data_ptr() != g.data_ptr() ? dz.data_ptr() : nullptr;
    params.ld_dz = k_pad;
    params.grad_bias = needs_bias_grad ? grad_bias_f32.data_ptr<float>() : nullptr;
    params.partials = needs_bias_grad ? partials.data_ptr<float>() : nullptr;
    C10_CUDA_CHECK(linear_bwd_prologue(params, current_stream(input)));
  }
  if (needs_bias_grad) grad_bias.copy_(grad_bias_f32);
  const at::Tensor dz_nhwc = dz.view({batch, out_h, out_w, k_pad});
  if (needs_preact_grad) grad_preact.copy_(dz_nhwc.narrow(3, 0, features).permute({0, 3, 1, 2}));
  if (!needs_input_grad && !needs_weight_grad) {
    return {grad_input, grad_weight, grad_bias, grad_preact};
  }
  const ConvGeometry geometry = conv_geometry(input, c_pad, k_pad, weight, stride_h, stride_w,
                                              pad_h, pad_w, dilation_h, dilation_w, out_h,
                                              out_w);
  const at::Tensor x = nhwc(input, c_pad);
  const cudaStream_t stream = current_stream(input);
  if (depthwise) {
    const at::Tensor w = weight.reshape({features, weight.size(2), weight.size(3)}).contiguous();
    at::Tensor gi = needs_input_grad ? at::empty({batch, input.size(2), input.size(3), channels},
                                                 options)
                                     : at::Tensor();
    at::Tensor gw = needs_weight_grad ? at::empty({features, weight.size(2), weight.size(3)},
                                                  options.dtype(at::kFloat))
                                      : at::Tensor();
    at::Tensor workspace = at::empty({depthwise_bwd_workspace_floats(geometry)},
                                     options.dtype(at::kFloat));
    DepthwiseBwdParams params{geometry, type, dz.data_ptr(), x.data_ptr(), w.data_ptr(),
                              needs_input_grad ? gi.data_ptr() : nullptr,
                              needs_weight_grad ? gw.data_ptr<float>() : nullptr,
                              workspace.data_ptr<float>()};
    C10_CUDA_CHECK(depthwise_bwd(params, stream));
    if (needs_input_grad) grad_input.copy_(gi.permute({0, 3, 1, 2}));
    if (needs_weight_grad) grad_weight.copy_(gw.view(weight.sizes()));
    return {grad_input, grad_weight, grad_bias, grad_preact};
  }
  const at::Tensor w = krsc(weight, k_pad, c_pad);
  if (needs_input_grad) {
    // Straight into grad_input when it is channels_last with C % 8 == 0, else via a buffer.
    const at::Tensor grad_input_nhwc = grad_input.permute({0, 2, 3, 1});
    const bool direct = c_pad == channels && grad_input_nhwc.is_contiguous();
    at::Tensor gi = direct ? grad_input_nhwc
                           : at::empty({batch, input.size(2), input.size(3), c_pad}, options);
    ConvDgradParams params{geometry, type, dz.data_ptr(), w.data_ptr(), gi.data_ptr()};
    check_conv_status(op, conv_dgrad(params, forced_path("FUSEDOPS_CONV_PATH"), stream));
    if (!direct) grad_input.copy_(gi.narrow(3, 0, channels).permute({0, 3, 1, 2}));
  }
  if (needs_weight_grad) {
    at::Tensor gw = at::empty({k_pad, weight.size(2), weight.size(3), c_pad}, options);
    at::Tensor workspace = at::empty({conv_wgrad_workspace_floats(geometry)},
                                     options.dtype(at::kFloat));
    ConvWgradParams params{geometry, type, dz.data_ptr(), x.data_ptr(), gw.data_ptr(),
                           workspace.data_ptr<float>()};
    check_conv_status(op, conv_wgrad(params, forced_path("FUSEDOPS_CONV_PATH"), stream));
    grad_weight.copy_(gw.narrow(0, 0, features).narrow(3, 0, channels).permute({0, 3, 1, 2}));
  }
  return {grad_input, grad_weight, grad_bias, grad_preact};
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
  info["ops"] = pybind11::make_tuple("ce_fwd_cuda", "ce_bwd_cuda", "ce_bwd_inplace_cuda",
                                     "linear_fwd_cuda", "linear_bwd_cuda",
                                     "linear_weight_grad_accumulate_cuda",
                                     "attention_fwd_cuda", "attention_bwd_cuda",
                                     "conv2d_fwd_cuda", "conv2d_bwd_cuda");
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
  m.def(
      "linear_fwd_cuda(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, "
      "str activation, bool allow_tf32) -> (Tensor, Tensor)");
  m.def(
      "linear_bwd_cuda(Tensor grad_out, Tensor input, Tensor weight, Tensor saved, "
      "str activation, bool allow_tf32, bool needs_input_grad, bool needs_weight_grad, "
      "bool needs_bias_grad, bool needs_preact_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_weight_grad_accumulate_cuda(Tensor grad_out, Tensor input, "
      "Tensor(a!) grad_weight, Tensor(b!)? grad_bias, bool allow_tf32) -> ()");
  m.def(
      "attention_fwd_cuda(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, "
      "Tensor? cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float scale, "
      "int window_left, int window_right, bool allow_tf32) -> (Tensor, Tensor)");
  m.def(
      "attention_bwd_cuda(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, SymInt max_seqlen_q, "
      "SymInt max_seqlen_k, float scale, int window_left, int window_right, bool allow_tf32, "
      "bool deterministic) -> (Tensor, Tensor, Tensor)");
  m.def(
      "conv2d_fwd_cuda(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, "
      "int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, "
      "SymInt out_h, SymInt out_w, int groups, str activation, bool out_channels_last, "
      "bool allow_tf32) -> (Tensor, Tensor)");
  m.def(
      "conv2d_bwd_cuda(Tensor grad_out, Tensor input, Tensor weight, Tensor saved, "
      "int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, "
      "SymInt out_h, SymInt out_w, int groups, str activation, bool allow_tf32, "
      "bool needs_input_grad, bool needs_weight_grad, bool needs_bias_grad, "
      "bool needs_preact_grad) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedops, CUDA, m) {
  m.impl("ce_fwd_cuda", &fusedops::ce_fwd_cuda);
  m.impl("ce_bwd_cuda", &fusedops::ce_bwd_cuda);
  m.impl("ce_bwd_inplace_cuda", &fusedops::ce_bwd_inplace_cuda);
  m.impl("linear_fwd_cuda", &fusedops::linear_fwd_cuda);
  m.impl("linear_bwd_cuda", &fusedops::linear_bwd_cuda);
  m.impl("linear_weight_grad_accumulate_cuda", &fusedops::linear_weight_grad_accumulate_cuda);
  m.impl("attention_fwd_cuda", &fusedops::attention_fwd_cuda);
  m.impl("attention_bwd_cuda", &fusedops::attention_bwd_cuda);
  m.impl("conv2d_fwd_cuda", &fusedops::conv2d_fwd_cuda);
  m.impl("conv2d_bwd_cuda", &fusedops::conv2d_bwd_cuda);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedops CUDA kernels (the ops are torch.ops.fusedops.*_cuda)";
  m.def("build_info", &fusedops::build_info,
        "How this extension was built: arches, CUDA and torch versions, aot or jit.");
}
