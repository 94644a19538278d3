// extern "C" entry points of the host emulation (csrc/cuda/host_emulation.cuh), which
// tests/test_cuda_backend.py builds with g++ -include host_emulation.cuh: the kernels, planned and
// parametrized by the same make_params.cuh as csrc/cuda/ops.cu, on host buffers (the split-K
// workspace in host vectors, partial sums poisoned with NaN); the launch policies of
// launch_policy.cuh for the test that ties them to the Triton ones; traffic counters and the CTA
// order. Not part of the extension (setup.py compiles csrc/*.cpp and csrc/cuda/*.cu only).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "fused_lora_gemm.cuh"
#include "launch_policy.cuh"
#include "lora_grads.cuh"
#include "make_params.cuh"

using namespace lora_ensemble;

namespace {

// dtype codes of the tests: 0 float32 (SIMT), 1 float16, 2 bfloat16 (tensor cores)
template <class F>
void dispatch(int dtype, F&& f) {
  if (dtype == 0) {
    f(float{});
  } else if (dtype == 1) {
    f(__half{});
  } else {
    f(__nv_bfloat16{});
  }
}

// Guard zone around each split-K workspace buffer (elements), and the arrival counters' sentinel.
constexpr int64_t kGuard = 4096;
constexpr int kSentinel = -12345;

// The plan's numbers for the tests, in this order.
void write_plan(const FusedPlan& plan, long long* out) {
  const long long values[] = {plan.block_rows,   plan.block_k,   plan.tile_members, plan.tile_rows,
                              plan.row_tiles,    plan.col_tiles, plan.member_groups, plan.k_splits,
                              plan.k_per_split};
  for (int i = 0; i < 9; ++i) out[i] = values[i];
}

}  // namespace

extern "C" {

// Plan of a fused call: block_rows, block_k, tile_members, tile_rows, row_tiles, col_tiles,
// member_groups, k_splits, k_per_split (9 values).
void emu_fused_plan(int dtype, int forward, long long n, long long m, long long inner, long long cols, long long r,
                    int shared, int multiprocessors, long long* plan) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    write_plan(plan_fused_lora_gemm<T>({n, m, inner, cols, r}, forward, shared, multiprocessors), plan);
  });
}

// One fused launch (forward: in = x, shrink = A, expand = B; dx: in = dy, shrink = B, expand = A) on
// host pointers, planned for a GPU of `multiprocessors` SMs; returns the first failed check or null.
const char* emu_fused(int dtype, int forward, const void* in, const void* weight, const void* bias, const void* shrink,
                      const void* expand, void* out, float* low, long long n, long long m, long long inner,
                      long long cols, long long r, float scaling, int shared, const void* base, int multiprocessors) {
  emu::reset_error();
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const FusedSizes sizes{n, m, inner, cols, r};
    const FusedPlan plan = plan_fused_lora_gemm<T>(sizes, forward, shared, multiprocessors);
    // The workspace with guard zones: NaN (partial sums: also what an unwritten partial reads as) and a
    // sentinel count around the zeroed arrival counters; checked after the launch.
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::vector<float> partial_base(plan.partial_base_floats + 2 * kGuard, nan);
    std::vector<float> partial_low(plan.partial_low_floats + 2 * kGuard, nan);
    std::vector<int> arrivals(plan.arrival_counters + 2 * kGuard, kSentinel);
    std::fill(arrivals.begin() + kGuard, arrivals.end() - kGuard, 0);
    const long long d = forward ? inner : cols;  // W0 [k, d]
    // forward: A [N, r, d] (ld d), B [N, k, r] (ld r); dx: B [N, k, r] (ld r), A [N, r, d] (ld d)
    const Operand in_op{in, inner}, weight_op{weight, d};
    const Operand shrink_op{shrink, forward ? d : r}, expand_op{expand, forward ? r : d};
    const FusedWorkspace workspace{partial_base.data() + kGuard, partial_low.data() + kGuard, arrivals.data() + kGuard};
    const auto p = make_fused_params<T>(in_op, weight_op, shrink_op, expand_op, bias, base, out, low, sizes, plan,
                                        workspace, scaling, shared, 0);
    launch_fused_lora_gemm<T>(p, forward, nullptr);
    for (int64_t i = 0; i < plan.arrival_counters; ++i) {
      EMU_CHECK(arrivals[kGuard + i] == plan.k_splits, "every split of every tile arrived once");
    }
    for (int64_t i = 0; i < kGuard; ++i) {
      EMU_CHECK(std::isnan(partial_base[i]) && std::isnan(partial_base[partial_base.size() - 1 - i]) &&
                    std::isnan(partial_low[i]) && std::isnan(partial_low[partial_low.size() - 1 - i]) &&
                    arrivals[i] == kSentinel && arrivals[arrivals.size() - 1 - i] == kSentinel,
                "split-K workspace written past its ends");
    }
  });
  return emu::error();
}

// Row splits of the weight gradients' plan, for a GPU of `multiprocessors` SMs.
int emu_grad_plan_splits(long long n, long long m, long long d, long long k, long long r, int multiprocessors,
                        int deterministic) {
  return plan_lora_grads({n, m, d, k, r}, multiprocessors, deterministic).row_splits;
}

// The weight gradients; with more than one row split, grad_A / grad_B are zeroed fp32 sums.
const char* emu_lora_grads(int dtype, const void* x, const void* dy, const float* xa, const float* dyb, void* grad_A,
                           void* grad_B, long long n, long long m, long long d, long long k, long long r, float scaling,
                           int shared, int multiprocessors, int deterministic) {
  emu::reset_error();
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const GradSizes sizes{n, m, d, k, r};
    const GradPlan plan = plan_lora_grads(sizes, multiprocessors, deterministic);
    const auto p =
        make_grad_params<T>({x, d}, {dy, k}, {xa, r}, {dyb, r}, grad_A, grad_B, sizes, plan, scaling, shared, 0);
    launch_lora_grads<T>(p, nullptr);
  });
  return emu::error();
}

// Traffic: count the bytes operand loads read from [begin, begin + bytes) in slot `slot` (0..7).
void emu_watch(int slot, const void* begin, long long bytes) { emu::watch(slot, begin, bytes); }
void emu_unwatch_all() { emu::unwatch_all(); }
long long emu_watched_bytes(int slot) { return emu::watched_bytes(slot); }

// CTA order of the following launches: 0 grid order, 1 reversed, 2 shuffled with `seed`.
void emu_cta_order(int order, unsigned seed) { emu::set_cta_order(order, seed); }

// The launch policies (launch_policy.cuh), for the test that compares them with the Triton ones.
int emu_block_rank(long long rank) { return block_rank(rank); }
long long emu_row_tile_members(long long rows_per_member, long long block_m, long long members) {
  return row_tile_members(rows_per_member, block_m, members);
}
int emu_stacked_block_rows(long long rows_per_member, long long members, int large_tile_members) {
  return stacked_block_rows(rows_per_member, members, large_tile_members);
}
long long emu_stacked_tile_rows(int block_rows, long long rows_per_member, long long members, int tile_members) {
  return stacked_tile_rows(block_rows, rows_per_member, members, tile_members);
}
int emu_shared_block_rows(long long rows, long long cols, int multiprocessors) {
  return shared_block_rows(rows, cols, multiprocessors);
}
int emu_shared_member_groups(long long tiles, long long passes, int multiprocessors) {
  return shared_member_groups(tiles, passes, multiprocessors);
}
int emu_fused_k_splits(long long programs, long long inner, int block_k, int multiprocessors) {
  return fused_k_splits(programs, inner, block_k, multiprocessors);
}
int emu_grad_row_splits(long long rows, long long programs_per_split, int multiprocessors, int deterministic) {
  return grad_row_splits(rows, programs_per_split, multiprocessors, deterministic);
}
long long emu_grad_rows_per_split(long long rows, int splits, int quantum) {
  return grad_rows_per_split(rows, splits, quantum);
}

}  // extern "C"
