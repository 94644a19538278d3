// The one builder of the kernels' parameters, on raw pointers (no ATen types): csrc/cuda/ops.cu wraps
// its tensors into Operands, the host emulation (csrc/cuda/host_emulation_entry.cpp) its host buffers,
// and both call the same planner and builders. A plan is the launch policies of launch_policy.cuh
// applied to the sizes, with the tile shape the kernel is compiled with (fused_tile.cuh); its
// workspace sizes say what the caller allocates before building the parameters.
#pragma once

#include <cstdint>

#include "fused_tile.cuh"
#include "launch_policy.cuh"
#include "params.cuh"

namespace lora_ensemble {

// A row-major matrix (or a stack of them) and its leading dimension, in elements; ptr nullptr: absent.
struct Operand {
  const void* ptr;
  int64_t ld;
};

// Whether an operand of element type T may use 16-byte asynchronous copies: a 16-byte aligned base and
// a leading dimension of whole 16-byte chunks (then every row and every member's matrix is aligned too).
template <class T>
bool vec_ok(Operand a) {
  constexpr int64_t kVec = 16 / static_cast<int64_t>(sizeof(T));
  return a.ptr != nullptr && reinterpret_cast<uintptr_t>(a.ptr) % 16 == 0 && a.ld % kVec == 0;
}

// Sizes of a fused call: N members, M rows per member (shared: M shared rows), the reduction length
// (forward d, dx k), the output width (forward k, dx d), the rank r.
struct FusedSizes {
  int64_t members, rows, inner, cols, rank;
};

struct FusedPlan {
  int block_rows;             // BM
  int block_k;                // BK
  int tile_members;           // members one pass of a CTA handles (fused_tile.cuh: kMembers)
  int64_t tile_rows;          // rows of `in` per row tile
  int64_t row_tiles, col_tiles;
  int member_groups;          // grid.y
  int k_splits;               // grid.z
  int64_t k_per_split;
  // Workspace (split-K only, else 0): fp32 partial sums and zeroed int arrival counters.
  int64_t partial_base_floats, partial_low_floats, arrival_counters;
};

template <class T>
FusedPlan plan_fused_lora_gemm(const FusedSizes& s, bool forward, bool shared, int multiprocessors) {
  FusedPlan plan{};
  const int rank_pad = block_rank(s.rank);
  plan.block_rows =
      shared ? shared_block_rows(s.rows, s.cols, multiprocessors)
             : stacked_block_rows(s.rows, s.members,
                                  fused_tile_shape<T>(forward, false, rank_pad, kLargeBlockRows).tile_members);
  const FusedTileShape shape = fused_tile_shape<T>(forward, shared, rank_pad, plan.block_rows);
  plan.block_k = shape.block_k;
  plan.tile_members = shape.tile_members;
  const int64_t in_rows = shared ? s.rows : s.members * s.rows;
  plan.tile_rows = shared ? plan.block_rows : stacked_tile_rows(plan.block_rows, s.rows, s.members, shape.tile_members);
  plan.row_tiles = policy_ceil_div(in_rows, plan.tile_rows);
  plan.col_tiles = policy_ceil_div(s.cols, shape.block_cols);
  const int64_t tiles = plan.row_tiles * plan.col_tiles;
  const int64_t passes = shared ? policy_ceil_div(s.members, shape.tile_members) : 1;
  plan.member_groups = shared && forward ? shared_member_groups(tiles, passes, multiprocessors) : 1;
  plan.k_splits = fused_k_splits(tiles * plan.member_groups, s.inner, plan.block_k, multiprocessors);
  plan.k_per_split = fused_k_per_split(s.inner, plan.k_splits, plan.block_k);
  if (plan.k_splits > 1) {
    plan.partial_base_floats = plan.member_groups * plan.k_splits * (shared ? s.rows : in_rows) * s.cols;
    plan.partial_low_floats = plan.k_splits * plan.col_tiles * s.members * s.rows * s.rank;  // per column tile
    plan.arrival_counters = plan.member_groups * tiles;
  }
  return plan;
}

struct FusedWorkspace {
  float* partial_base;  // plan.partial_base_floats
  float* partial_low;   // plan.partial_low_floats
  int* arrivals;        // plan.arrival_counters, zeroed
};

// The fused kernel's parameters in either role: `in` [*, M, inner] with its shrink [N, *, *] and expand
// [N, *, *], the optional W0 (weight.ptr nullptr: none), bias and base output, writing `out` and the
// fp32 rank product `low`.
template <class T>
FusedLoraGemmParams<T> make_fused_params(Operand in, Operand weight, Operand shrink, Operand expand, const void* bias,
                                         const void* base, void* out, float* low, const FusedSizes& s,
                                         const FusedPlan& plan, const FusedWorkspace& workspace, float scaling,
                                         bool shared, int device) {
  FusedLoraGemmParams<T> p{};
  // device pointers
  p.in = static_cast<const T*>(in.ptr);
  p.weight = static_cast<const T*>(weight.ptr);
  p.bias = static_cast<const T*>(bias);
  p.base = static_cast<const T*>(base);
  p.shrink = static_cast<const T*>(shrink.ptr);
  p.expand = static_cast<const T*>(expand.ptr);
  p.out = static_cast<T*>(out);
  p.low = low;
  // sizes
  p.members = static_cast<int>(s.members);
  p.rows = static_cast<int>(s.rows);
  p.inner = static_cast<int>(s.inner);
  p.cols = static_cast<int>(s.cols);
  p.rank = static_cast<int>(s.rank);
  p.scaling = scaling;
  p.shared = shared;
  // tiling
  p.block_rows = plan.block_rows;
  p.tile_rows = static_cast<int>(plan.tile_rows);
  p.row_tiles = static_cast<int>(plan.row_tiles);
  p.col_tiles = static_cast<int>(plan.col_tiles);
  p.member_groups = plan.member_groups;
  p.k_splits = plan.k_splits;
  p.k_per_split = static_cast<int>(plan.k_per_split);
  p.partial_base = workspace.partial_base;
  p.partial_low = workspace.partial_low;
  p.arrivals = workspace.arrivals;
  p.device = device;
  p.vec_in = vec_ok<T>(in);
  p.vec_weight = vec_ok<T>(weight);
  p.vec_shrink = vec_ok<T>(shrink);
  p.vec_expand = vec_ok<T>(expand);
  return p;
}

// Sizes of the weight-gradient call: N members, M rows per member, d in, k out, r rank.
struct GradSizes {
  int64_t members, rows, d, k, rank;
};

struct GradPlan {
  int row_splits;          // grid.z; > 1: the outputs are fp32 sums, zeroed by the caller
  int64_t rows_per_split;
};

inline GradPlan plan_lora_grads(const GradSizes& s, int multiprocessors, bool deterministic) {
  const int64_t programs = s.members * (policy_ceil_div(s.d, kGradBlockCols) + policy_ceil_div(s.k, kGradBlockCols));
  GradPlan plan{};
  plan.row_splits = grad_row_splits(s.rows, programs, multiprocessors, deterministic);
  plan.rows_per_split = grad_rows_per_split(s.rows, plan.row_splits);
  return plan;
}

// The weight-gradient kernel's parameters: x [*, M, d], dy [N, M, k], xa / dyb [N, M, r] fp32; with one
// row range grad_A [N, r, d] / grad_B [N, k, r] in T, with several the fp32 sums of the same shapes.
template <class T>
LoraGradParams<T> make_grad_params(Operand x, Operand dy, Operand xa, Operand dyb, void* grad_A, void* grad_B,
                                   const GradSizes& s, const GradPlan& plan, float scaling, bool shared, int device) {
  LoraGradParams<T> p{};
  const bool split = plan.row_splits > 1;
  // device pointers
  p.x = static_cast<const T*>(x.ptr);
  p.dy = static_cast<const T*>(dy.ptr);
  p.xa = static_cast<const float*>(xa.ptr);
  p.dyb = static_cast<const float*>(dyb.ptr);
  p.grad_A = split ? nullptr : static_cast<T*>(grad_A);
  p.grad_B = split ? nullptr : static_cast<T*>(grad_B);
  p.grad_A_sum = split ? static_cast<float*>(grad_A) : nullptr;
  p.grad_B_sum = split ? static_cast<float*>(grad_B) : nullptr;
  // sizes
  p.members = static_cast<int>(s.members);
  p.rows = static_cast<int>(s.rows);
  p.d = static_cast<int>(s.d);
  p.k = static_cast<int>(s.k);
  p.rank = static_cast<int>(s.rank);
  p.rows_per_split = static_cast<int>(plan.rows_per_split);
  p.scaling = scaling;
  p.shared = shared;
  p.device = device;
  p.vec_x = vec_ok<T>(x);
  p.vec_dy = vec_ok<T>(dy);
  p.vec_low = vec_ok<float>(xa) && vec_ok<float>(dyb);
  return p;
}

}  // namespace lora_ensemble
