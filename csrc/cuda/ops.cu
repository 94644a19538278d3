// CUDA implementations of lora_ensemble::cuda_forward, cuda_backward_dx and cuda_backward_lora
// (schemas in csrc/lora_ensemble.cpp): input checks with messages that name the argument and its
// shape, output and workspace allocation, dtype dispatch, and launches on the current stream of the
// inputs' device. The launch plan and the kernel parameters come from make_params.cuh (shared with
// the host emulation of the tests). forward and backward_dx are one kernel launch each
// (fused_lora_gemm.cuh; with split-K, after a zero fill of the tile arrival counters), backward_lora
// is one grouped launch for every member's dA and dB (lora_grads.cuh).
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "common.cuh"
#include "make_params.cuh"
#include "params.cuh"

namespace lora_ensemble {
namespace {

constexpr int64_t kIntMax = std::numeric_limits<int>::max();

void check_operand(const at::Tensor& t, const char* op, const char* name, const at::Tensor& like, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but the first input is on ",
              like.device());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got shape ", t.sizes(), " strides ",
              t.strides());
  for (int64_t s : t.sizes()) {
    TORCH_CHECK(s <= kIntMax, op, ": ", name, " shape ", t.sizes(), " has a dim over 2^31 - 1");
  }
}

void check_dtype(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " has dtype ", t.scalar_type(), ", expected ", dtype);
}

void check_float_input(const at::Tensor& t, const char* op, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, ": ", name, " has dtype ", dt,
              "; the cuda backend supports float32, float16 and bfloat16");
}

void check_rank(int64_t rank, const char* op, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(rank >= 1 && rank <= kMaxRank, op, ": rank r=", rank, " (", name, " shape ", shape,
              ") must be in 1..", kMaxRank, " for the cuda backend");
}

// A contiguous tensor as a row-major matrix operand with its last dim as the leading dimension.
Operand operand(const at::Tensor& t) { return {t.data_ptr(), t.size(-1)}; }
Operand operand(const at::Tensor* t) { return t != nullptr ? operand(*t) : Operand{nullptr, 0}; }
const void* data_or_null(const at::Tensor* t) { return t != nullptr ? t->data_ptr() : nullptr; }

template <class F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, "lora_ensemble cuda backend: unsupported dtype ", dtype);
  }
}

cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

int multiprocessor_count(int device) {
  static std::array<int, 64> counts{};
  if (device < 0 || device >= static_cast<int>(counts.size())) return 1;
  if (counts[device] == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device));
  }
  return counts[device];
}

// The split-K workspace of a fused launch plan: fp32 partial sums and zeroed arrival counters (the
// tensors must live until the launch is queued; the caching allocator keeps them stream-ordered).
struct WorkspaceTensors {
  at::Tensor partial_base, partial_low, arrivals;
  FusedWorkspace pointers() {
    return {partial_base.defined() ? partial_base.data_ptr<float>() : nullptr,
            partial_low.defined() ? partial_low.data_ptr<float>() : nullptr,
            arrivals.defined() ? arrivals.data_ptr<int>() : nullptr};
  }
};

WorkspaceTensors allocate_workspace(const FusedPlan& plan, const at::Tensor& like) {
  WorkspaceTensors ws;
  if (plan.k_splits > 1) {
    ws.partial_base = at::empty({plan.partial_base_floats}, like.options().dtype(at::kFloat));
    ws.partial_low = at::empty({plan.partial_low_floats}, like.options().dtype(at::kFloat));
    ws.arrivals = at::zeros({plan.arrival_counters}, like.options().dtype(at::kInt));
  }
  return ws;
}

const at::Tensor* present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined() ? &*t : nullptr; }

// The LoRA factors' checks shared by the forward and backward-dx ops: lora_A [N, r, d], lora_B [N, k, r].
void check_factors(const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& like, const char* op,
                   int64_t k, int64_t d) {
  check_operand(lora_A, op, "lora_A", like, 3);
  check_operand(lora_B, op, "lora_B", like, 3);
  check_dtype(lora_A, op, "lora_A", like.scalar_type());
  check_dtype(lora_B, op, "lora_B", like.scalar_type());
  const int64_t n = lora_A.size(0), r = lora_A.size(1);
  check_rank(r, op, "lora_A", lora_A.sizes());
  TORCH_CHECK(k > 0 && d > 0, op, ": k=", k, ", d=", d, " must be >= 1 (lora_B shape ", lora_B.sizes(),
              ", lora_A shape ", lora_A.sizes(), ")");
  TORCH_CHECK(lora_A.size(2) == d, op, ": lora_A shape ", lora_A.sizes(), " must be [N, r, d] with d=", d);
  TORCH_CHECK(lora_B.size(0) == n && lora_B.size(1) == k && lora_B.size(2) == r, op, ": lora_B shape ",
              lora_B.sizes(), " must be [N, k, r] = [", n, ", ", k, ", ", r, "]");
}

// (k, d): W0's [k, d] when given (checked), else from lora_B [N, k, r] and lora_A [N, r, d].
std::pair<int64_t, int64_t> check_weight(const at::Tensor* weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                         const at::Tensor& like, const char* op) {
  if (weight == nullptr) return {lora_B.size(1), lora_A.size(2)};
  check_operand(*weight, op, "weight", like, 2);
  check_dtype(*weight, op, "weight", like.scalar_type());
  return {weight->size(0), weight->size(1)};
}

std::tuple<at::Tensor, at::Tensor> cuda_forward(const at::Tensor& x, const std::optional<at::Tensor>& weight_opt,
                                                const std::optional<at::Tensor>& bias,
                                                const std::optional<at::Tensor>& base_opt, const at::Tensor& lora_A,
                                                const at::Tensor& lora_B, double scaling, bool shared_input) {
  constexpr const char* op = "lora_ensemble::cuda_forward";
  check_float_input(x, op, "x");
  check_operand(x, op, shared_input ? "x (shared_input, [M, d])" : "x ([N, M, d])", x, shared_input ? 2 : 3);
  const at::Tensor* weight = present(weight_opt);
  const auto [k, d] = check_weight(weight, lora_A, lora_B, x, op);
  check_factors(lora_A, lora_B, x, op, k, d);
  const int64_t n = lora_A.size(0), r = lora_A.size(1);
  const int64_t m = x.size(-2);
  TORCH_CHECK(x.size(-1) == d, op, ": x shape ", x.sizes(), " must end in d=", d, " (lora_A shape ", lora_A.sizes(),
              ")");
  TORCH_CHECK(shared_input || x.size(0) == n, op, ": x shape ", x.sizes(), " must be [N, M, d] with N=", n,
              " (lora_A shape ", lora_A.sizes(), ")");
  TORCH_CHECK(n * m <= kIntMax, op, ": N*M = ", n, "*", m, " rows exceed 2^31 - 1");
  const at::Tensor* b = present(bias);
  if (b != nullptr) {
    check_operand(*b, op, "bias", x, 1);
    check_dtype(*b, op, "bias", x.scalar_type());
    TORCH_CHECK(b->size(0) == k, op, ": bias shape ", b->sizes(), " must be [k] = [", k, "]");
  }
  const at::Tensor* base = present(base_opt);
  if (base != nullptr) {
    check_operand(*base, op, shared_input ? "base (shared_input, [M, k])" : "base ([N, M, k])", x,
                  shared_input ? 2 : 3);
    check_dtype(*base, op, "base", x.scalar_type());
    TORCH_CHECK(base->size(-2) == m && base->size(-1) == k && (shared_input || base->size(0) == n), op,
                ": base shape ", base->sizes(), " must be ", shared_input ? "[M, k]" : "[N, M, k]", " with N=", n,
                ", M=", m, ", k=", k);
  }

  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({n, m, k}, x.options());
  at::Tensor xa = at::empty({n, m, r}, x.options().dtype(at::kFloat));
  if (m == 0 || n == 0) return {out, xa};
  const int device = x.device().index();
  const FusedSizes sizes{n, m, d, k, r};
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const FusedPlan plan =
        plan_fused_lora_gemm<T>(sizes, /*forward=*/true, shared_input, multiprocessor_count(device));
    WorkspaceTensors workspace = allocate_workspace(plan, x);
    // in = x [*, M, d], shrink = A [N, r, d], expand = B [N, k, r]
    const auto p = make_fused_params<T>(operand(x), operand(weight), operand(lora_A), operand(lora_B), data_or_null(b),
                                        data_or_null(base), out.data_ptr(), xa.data_ptr<float>(), sizes, plan,
                                        workspace.pointers(), static_cast<float>(scaling), shared_input, device);
    launch_fused_lora_gemm<T>(p, /*forward=*/true, current_stream(x));
  });
  return {out, xa};
}

std::tuple<at::Tensor, at::Tensor> cuda_backward_dx(const at::Tensor& grad_out,
                                                    const std::optional<at::Tensor>& weight_opt,
                                                    const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                    double scaling, bool shared_input) {
  constexpr const char* op = "lora_ensemble::cuda_backward_dx";
  check_float_input(grad_out, op, "grad_out");
  check_operand(grad_out, op, "grad_out ([N, M, k])", grad_out, 3);
  const at::Tensor* weight = present(weight_opt);
  const auto [k, d] = check_weight(weight, lora_A, lora_B, grad_out, op);
  check_factors(lora_A, lora_B, grad_out, op, k, d);
  const int64_t n = lora_A.size(0), r = lora_A.size(1);
  const int64_t m = grad_out.size(1);
  TORCH_CHECK(grad_out.size(0) == n && grad_out.size(2) == k, op, ": grad_out shape ", grad_out.sizes(),
              " must be [N, M, k] with N=", n, ", k=", k, " (lora_A shape ", lora_A.sizes(), ", lora_B shape ",
              lora_B.sizes(), ")");
  TORCH_CHECK(n * m <= kIntMax, op, ": N*M = ", n, "*", m, " rows exceed 2^31 - 1");

  c10::cuda::CUDAGuard guard(grad_out.device());
  at::Tensor dx = shared_input ? at::empty({m, d}, grad_out.options()) : at::empty({n, m, d}, grad_out.options());
  at::Tensor dyb = at::empty({n, m, r}, grad_out.options().dtype(at::kFloat));
  if (m == 0) return {dx, dyb};
  if (n == 0) return {dx.zero_(), dyb};
  const int device = grad_out.device().index();
  const FusedSizes sizes{n, m, k, d, r};
  dispatch_dtype(grad_out.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const FusedPlan plan =
        plan_fused_lora_gemm<T>(sizes, /*forward=*/false, shared_input, multiprocessor_count(device));
    WorkspaceTensors workspace = allocate_workspace(plan, grad_out);
    // in = dy [N, M, k], shrink = B [N, k, r], expand = A [N, r, d]
    const auto p = make_fused_params<T>(operand(grad_out), operand(weight), operand(lora_B), operand(lora_A), nullptr,
                                        nullptr, dx.data_ptr(), dyb.data_ptr<float>(), sizes, plan,
                                        workspace.pointers(), static_cast<float>(scaling), shared_input, device);
    launch_fused_lora_gemm<T>(p, /*forward=*/false, current_stream(grad_out));
  });
  return {dx, dyb};
}

std::tuple<at::Tensor, at::Tensor> cuda_backward_lora(const at::Tensor& grad_out, const at::Tensor& x,
                                                      const at::Tensor& xa, const at::Tensor& dyb, double scaling,
                                                      bool shared_input) {
  constexpr const char* op = "lora_ensemble::cuda_backward_lora";
  check_float_input(grad_out, op, "grad_out");
  check_operand(grad_out, op, "grad_out ([N, M, k])", grad_out, 3);
  check_operand(x, op, shared_input ? "x (shared_input, [M, d])" : "x ([N, M, d])", grad_out, shared_input ? 2 : 3);
  check_operand(xa, op, "xa ([N, M, r])", grad_out, 3);
  check_operand(dyb, op, "dyb ([N, M, r])", grad_out, 3);
  const auto dtype = grad_out.scalar_type();
  check_dtype(x, op, "x", dtype);
  check_dtype(xa, op, "xa", at::kFloat);
  check_dtype(dyb, op, "dyb", at::kFloat);
  const int64_t n = grad_out.size(0), m = grad_out.size(1), k = grad_out.size(2);
  const int64_t d = x.size(-1), r = xa.size(2);
  check_rank(r, op, "xa", xa.sizes());
  TORCH_CHECK(k > 0 && d > 0, op, ": grad_out shape ", grad_out.sizes(), " and x shape ", x.sizes(),
              " need k, d >= 1");
  TORCH_CHECK(x.size(-2) == m && (shared_input || x.size(0) == n), op, ": x shape ", x.sizes(), " must be ",
              shared_input ? "[M, d]" : "[N, M, d]", " with N=", n, ", M=", m, " (grad_out shape ", grad_out.sizes(),
              ")");
  TORCH_CHECK(xa.size(0) == n && xa.size(1) == m, op, ": xa shape ", xa.sizes(), " must be [N, M, r] with N=", n,
              ", M=", m, " (grad_out shape ", grad_out.sizes(), ")");
  TORCH_CHECK(dyb.sizes() == xa.sizes(), op, ": dyb shape ", dyb.sizes(), " must equal xa shape ", xa.sizes());
  TORCH_CHECK(n <= kMaxGridYZ, op, ": N=", n, " members exceeds ", kMaxGridYZ);

  c10::cuda::CUDAGuard guard(grad_out.device());
  if (n == 0) return {at::empty({n, r, d}, grad_out.options()), at::empty({n, k, r}, grad_out.options())};
  const int device = grad_out.device().index();
  const GradSizes sizes{n, m, d, k, r};
  const GradPlan plan =
      plan_lora_grads(sizes, multiprocessor_count(device), at::globalContext().deterministicAlgorithms());
  const bool split = plan.row_splits > 1;
  // Several row ranges: fp32 sums, zeroed (atomics add into them), cast at the end.
  const auto sum_options = grad_out.options().dtype(at::kFloat);
  at::Tensor grad_A = split ? at::zeros({n, r, d}, sum_options) : at::empty({n, r, d}, grad_out.options());
  at::Tensor grad_B = split ? at::zeros({n, k, r}, sum_options) : at::empty({n, k, r}, grad_out.options());
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto p = make_grad_params<T>(operand(x), operand(grad_out), operand(xa), operand(dyb), grad_A.data_ptr(),
                                       grad_B.data_ptr(), sizes, plan, static_cast<float>(scaling), shared_input,
                                       device);
    launch_lora_grads<T>(p, current_stream(grad_out));
  });
  if (split && dtype != at::kFloat) return {grad_A.to(dtype), grad_B.to(dtype)};
  return {grad_A, grad_B};
}

// An empty kernel of this translation unit, compiled with the same -gencode flags as every kernel of
// the extension: whether the runtime finds an image of it for a device says whether it finds one of
// them (SASS of the device's major architecture, or PTX it can JIT-compile).
__global__ void probe_kernel() {}

bool cuda_has_kernel_image(int64_t device) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaFuncAttributes attributes;
  const cudaError_t status = cudaFuncGetAttributes(&attributes, probe_kernel);
  if (status == cudaErrorNoKernelImageForDevice || status == cudaErrorInvalidDeviceFunction) {
    (void)cudaGetLastError();  // clear the (non-sticky) error so that a later check does not report it
    return false;
  }
  C10_CUDA_CHECK(status);
  return true;
}

// setup.py passes TORCH_CUDA_ARCH_LIST as -DLORA_ENSEMBLE_CUDA_ARCHS=8.0_9.0+PTX (bare tokens).
#define LORA_ENSEMBLE_STRINGIZE(...) #__VA_ARGS__
#define LORA_ENSEMBLE_EXPAND_STRINGIZE(...) LORA_ENSEMBLE_STRINGIZE(__VA_ARGS__)
#ifdef LORA_ENSEMBLE_CUDA_ARCHS
constexpr const char* kBuildArchs = LORA_ENSEMBLE_EXPAND_STRINGIZE(LORA_ENSEMBLE_CUDA_ARCHS);
#else
constexpr const char* kBuildArchs = "";
#endif

std::string cuda_build_archs() { return kBuildArchs; }

}  // namespace
}  // namespace lora_ensemble

// Queries about the build, with no tensor arguments (so registered with a catch-all kernel).
TORCH_LIBRARY_FRAGMENT(lora_ensemble, m) {
  m.def("cuda_has_kernel_image(int device) -> bool", &lora_ensemble::cuda_has_kernel_image);
  m.def("cuda_build_archs() -> str", &lora_ensemble::cuda_build_archs);
}

TORCH_LIBRARY_IMPL(lora_ensemble, CUDA, m) {
  m.impl("cuda_forward", &lora_ensemble::cuda_forward);
  m.impl("cuda_backward_dx", &lora_ensemble::cuda_backward_dx);
  m.impl("cuda_backward_lora", &lora_ensemble::cuda_backward_lora);
}
