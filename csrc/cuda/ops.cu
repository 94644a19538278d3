// CUDA implementations of lora_ensemble::cuda_forward, cuda_backward_dx and cuda_backward_lora
// (schemas in csrc/lora_ensemble.cpp): input checks with messages that name the argument and its
// shape, output allocation, dtype and rank dispatch, and launches on the current stream of the
// inputs' device. forward and backward_dx are one launch each (fused_lora_gemm.cuh),
// backward_lora is one grouped launch for every member's dA and dB (lora_grads.cuh).
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
#include "params.cuh"

namespace lora_ensemble {
namespace {

constexpr int64_t kIntMax = std::numeric_limits<int>::max();
constexpr int64_t kMaxGridY = 65535;

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

// 16-byte asynchronous copies need a 16-byte aligned base and a leading dim of whole 16-byte chunks.
bool vec_ok(const at::Tensor& t, int64_t ld) {
  const int64_t vec = 16 / t.element_size();
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && ld % vec == 0;
}

template <class T>
const T* ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}
template <class T>
T* mut_ptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

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

// The weight-gradient kernel splits rows only when every range keeps at least this many.
constexpr int64_t kMinRowsPerSplit = 512;

// Member groups of the shared-input kernels: 1 while their 64 x 128 output tiles fill the GPU; at
// small batches enough groups to occupy every SM (batch-1 ViT-B, 197 x 768: 24 tiles on 132 SMs -> 5
// groups). Forward: each group computes x W0^T for its own members. Backward dx: each group sums its
// members' dx into an fp32 output with atomics (so not under deterministic algorithms).
int shared_member_groups(int64_t rows, int64_t cols, int64_t members, int device) {
  const int64_t tiles = ceil_div(static_cast<int>(rows), 64) * static_cast<int64_t>(ceil_div(static_cast<int>(cols), 128));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(members, multiprocessor_count(device) / tiles)));
}

// The fused kernel's parameters in either role: `in` [*, M, inner] with its shrink [N, *, *] and expand
// [N, *, *] (leading dimensions shrink_ld, expand_ld), the optional W0, bias and base output, writing
// `out` and the fp32 rank product `low`.
template <class T>
FusedLoraGemmParams<T> fused_params(const at::Tensor& in, int64_t in_ld, const at::Tensor* weight,
                                    const at::Tensor* bias, const at::Tensor* base, const at::Tensor& shrink,
                                    int64_t shrink_ld, const at::Tensor& expand, int64_t expand_ld, at::Tensor& out,
                                    at::Tensor& low, int64_t members, int64_t rows, int64_t inner, int64_t cols,
                                    int64_t rank, double scaling, bool shared, int device) {
  FusedLoraGemmParams<T> p{};
  p.in = ptr<T>(in);
  p.weight = weight != nullptr ? ptr<T>(*weight) : nullptr;
  p.bias = bias != nullptr ? ptr<T>(*bias) : nullptr;
  p.base = base != nullptr ? ptr<T>(*base) : nullptr;
  p.shrink = ptr<T>(shrink);
  p.expand = ptr<T>(expand);
  p.out = mut_ptr<T>(out);
  p.low = mut_ptr<float>(low);
  p.members = static_cast<int>(members);
  p.rows = static_cast<int>(rows);
  p.inner = static_cast<int>(inner);
  p.cols = static_cast<int>(cols);
  p.rank = static_cast<int>(rank);
  p.scaling = static_cast<float>(scaling);
  p.shared = shared;
  p.member_groups = 1;
  p.out_sum = nullptr;
  p.device = device;
  p.vec_in = vec_ok(in, in_ld);
  p.vec_weight = weight != nullptr && vec_ok(*weight, weight->size(1));
  p.vec_shrink = vec_ok(shrink, shrink_ld);
  p.vec_expand = vec_ok(expand, expand_ld);
  return p;
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
  TORCH_CHECK(shared_input || n <= kMaxGridY, op, ": N=", n, " members exceeds ", kMaxGridY);
  const at::Tensor* b = present(bias);
  if (b != nullptr) {
    check_operand(*b, op, "bias", x, 1);
    check_dtype(*b, op, "bias", x.scalar_type());
    TORCH_CHECK(b->size(0) == k, op, ": bias shape ", b->sizes(), " must be [k] = [", k, "]");
  }
  const at::Tensor* base = present(base_opt);
  if (base != nullptr) {
    check_operand(*base, op, shared_input ? "base (shared_input, [M, k])" : "base ([N, M, k])", x, shared_input ? 2 : 3);
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
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    // in = x [*, M, d], shrink = A [N, r, d], expand = B [N, k, r]
    auto p = fused_params<T>(x, d, weight, b, base, lora_A, d, lora_B, r, out, xa, n, m, d, k, r, scaling,
                             shared_input, device);
    p.member_groups = shared_input ? shared_member_groups(m, k, n, device) : 1;
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
  TORCH_CHECK(shared_input || n <= kMaxGridY, op, ": N=", n, " members exceeds ", kMaxGridY);

  c10::cuda::CUDAGuard guard(grad_out.device());
  at::Tensor dx = shared_input ? at::empty({m, d}, grad_out.options()) : at::empty({n, m, d}, grad_out.options());
  at::Tensor dyb = at::empty({n, m, r}, grad_out.options().dtype(at::kFloat));
  if (m == 0) return {dx, dyb};
  if (n == 0) return {dx.zero_(), dyb};
  const int device = grad_out.device().index();
  const int groups = shared_input && !at::globalContext().deterministicAlgorithms()
                         ? shared_member_groups(m, d, n, device)
                         : 1;
  at::Tensor dx_sum = groups > 1 ? at::zeros({m, d}, grad_out.options().dtype(at::kFloat)) : at::Tensor();
  dispatch_dtype(grad_out.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    // in = dy [N, M, k], shrink = B [N, k, r], expand = A [N, r, d]
    auto p = fused_params<T>(grad_out, k, weight, nullptr, nullptr, lora_B, r, lora_A, d, dx, dyb, n, m, k, d, r,
                             scaling, shared_input, device);
    p.member_groups = groups;
    p.out_sum = groups > 1 ? mut_ptr<float>(dx_sum) : nullptr;
    launch_fused_lora_gemm<T>(p, /*forward=*/false, current_stream(grad_out));
  });
  if (groups > 1) dx.copy_(dx_sum);
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
  TORCH_CHECK(n <= kMaxGridY, op, ": N=", n, " members exceeds ", kMaxGridY);

  c10::cuda::CUDAGuard guard(grad_out.device());
  if (n == 0) return {at::empty({n, r, d}, grad_out.options()), at::empty({n, k, r}, grad_out.options())};
  const int device = grad_out.device().index();
  // Long inputs whose (column tile, member) CTAs alone leave SMs idle are split into row ranges whose
  // partial sums meet in fp32 outputs (atomics: not under deterministic algorithms).
  const int64_t programs = n * (ceil_div(static_cast<int>(d), 128) + ceil_div(static_cast<int>(k), 128));
  int64_t splits = 1;
  if (!at::globalContext().deterministicAlgorithms()) {
    splits = std::min<int64_t>((2 * multiprocessor_count(device) + programs - 1) / programs, m / kMinRowsPerSplit);
    splits = std::max<int64_t>(1, std::min<int64_t>(splits, kMaxGridY));
  }
  const int64_t rows_per_split =
      splits > 1 ? round_up(ceil_div(static_cast<int>(m), static_cast<int>(splits)), 32) : std::max<int64_t>(m, 1);
  const auto sum_options = grad_out.options().dtype(at::kFloat);
  at::Tensor grad_A = splits > 1 ? at::zeros({n, r, d}, sum_options) : at::empty({n, r, d}, grad_out.options());
  at::Tensor grad_B = splits > 1 ? at::zeros({n, k, r}, sum_options) : at::empty({n, k, r}, grad_out.options());
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    LoraGradParams<T> p{};
    p.x = ptr<T>(x);
    p.dy = ptr<T>(grad_out);
    p.xa = ptr<float>(xa);
    p.dyb = ptr<float>(dyb);
    p.grad_A = splits > 1 ? nullptr : mut_ptr<T>(grad_A);
    p.grad_B = splits > 1 ? nullptr : mut_ptr<T>(grad_B);
    p.grad_A_sum = splits > 1 ? mut_ptr<float>(grad_A) : nullptr;
    p.grad_B_sum = splits > 1 ? mut_ptr<float>(grad_B) : nullptr;
    p.members = static_cast<int>(n);
    p.rows = static_cast<int>(m);
    p.d = static_cast<int>(d);
    p.k = static_cast<int>(k);
    p.rank = static_cast<int>(r);
    p.rows_per_split = static_cast<int>(rows_per_split);
    p.scaling = static_cast<float>(scaling);
    p.shared = shared_input;
    p.device = device;
    p.vec_x = vec_ok(x, d);
    p.vec_dy = vec_ok(grad_out, k);
    p.vec_low = vec_ok(xa, r) && vec_ok(dyb, r);
    launch_lora_grads<T>(p, current_stream(grad_out));
  });
  if (splits > 1 && dtype != at::kFloat) return {grad_A.to(dtype), grad_B.to(dtype)};
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
