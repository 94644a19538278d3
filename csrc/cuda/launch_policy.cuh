// Launch policies of the CUDA kernels, in one place: the row tile of the fused kernels, how the
// stacked rows are cut into row tiles, member groups of the shared-input forward, split-K of the
// fused kernels, and the row split of the weight gradients. Plain host functions of sizes and the
// GPU's SM count (no CUDA types), so that make_params.cuh, the host emulation and the test that ties
// them to the Triton policies (kernels/launch_policy.py; tests/test_launch_policies.py) all call
// these. Where a policy exists in both languages it has the same name: block_rank,
// row_tile_members, stacked_block_rows, shared_block_rows, fused_k_splits, grad_row_splits,
// grad_rows_per_split; where the kernels differ (the CUDA kernels have 16- and 64-row tiles and
// split-K in the shared-input kernels too, the Triton ones power-of-two tiles up to 128 and extra rank
// passes) the policies do too, as their comments say.
//
// Worked example, Llama-7B q_proj at decode (16 members x 1 row, d = k = 4096, r = 16, 132 SMs):
// block_rank(16) = 16; row_tile_members(1, 64, 16) = 16 members would share a 64-row tile, more than
// its shrink slices hold (4), so stacked_block_rows = 16; a 16-row tile holds 16 members' slices
// (fused_tile.cuh), so stacked_tile_rows = 16: one row tile of all 16 rows, W0 read once. 32 column
// tiles on 132 SMs: fused_k_splits(32, 4096, 32, 132) = 4 ranges of 1024 (32 K steps each), 128 CTAs.
// At 16 rows per member: row_tile_members(16, 64, 16) = 4, so 64-row tiles of 4 members, W0 read 4
// times (16 with one member per tile).
#pragma once

#include <algorithm>
#include <cstdint>

namespace lora_ensemble {

// Row tiles of the fused kernels: 16 rows (the WMMA minimum: decode and small batches), or 64.
constexpr int kSmallBlockRows = 16;
constexpr int kLargeBlockRows = 64;
// Output columns of a fused CTA (BN; Triton: POLICY_BLOCK_COLS) and rows j of a weight-gradient CTA (BJ).
constexpr int kFusedBlockCols = 128;
constexpr int kGradBlockCols = 128;
// Split-K of the fused kernels: each range reduces at least this many elements, at most this many ranges.
constexpr int kMinInnerPerSplit = 128;
constexpr int kMaxInnerSplits = 16;
// Weight gradients: split rows only when every range keeps at least this many (Triton:
// GRAD_MIN_ROWS_PER_SPLIT); a range is a multiple of this many rows, the kernel's row step BKM
// (Triton: GRAD_ROW_QUANTUM = 16, its row tiles being multiples of 16).
constexpr int kGradMinRowsPerSplit = 512;
constexpr int kGradRowQuantum = 32;
// grid.y and grid.z limit.
constexpr int64_t kMaxGridYZ = 65535;

constexpr int64_t policy_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int64_t policy_gcd(int64_t a, int64_t b) { return b == 0 ? a : policy_gcd(b, a % b); }

// The rank tile the kernels are instantiated for: r padded to 16, 32, 64 or 128 (r <= 128).
constexpr int block_rank(int64_t rank) { return rank <= 16 ? 16 : rank <= 32 ? 32 : rank <= 64 ? 64 : 128; }

// The most members one row tile of `block_m` stacked rows spans (tiles start at multiples of block_m;
// rows are member-major, `rows_per_member` each): 1 when block_m divides rows_per_member,
// block_m / rows_per_member when that divides block_m.
constexpr int64_t row_tile_members(int64_t rows_per_member, int64_t block_m, int64_t members) {
  const int64_t m = std::max<int64_t>(rows_per_member, 1);
  const int64_t last_start = m - policy_gcd(block_m, m);  // the latest offset in a member a tile can start at
  return std::max<int64_t>(1, std::min<int64_t>(members, (last_start + block_m - 1) / m + 1));
}

// BM of the stacked kernels (forward and dx): 64 when a 64-row tile spans no more members than it has
// shrink slices for (`large_tile_members`, fused_tile.cuh: from 16-22 rows per member on), else 16.
// (Triton: a power of two up to 128, grown while the members' rank parts fit one pass.)
constexpr int stacked_block_rows(int64_t rows_per_member, int64_t members, int large_tile_members) {
  return row_tile_members(rows_per_member, kLargeBlockRows, members) <= large_tile_members ? kLargeBlockRows
                                                                                            : kSmallBlockRows;
}

// Rows of the stacked N * M rows one row tile covers: `block_rows` (the plain GEMM tiling, tiles
// crossing member boundaries) while such a tile spans at most `tile_members` members (the kernel's
// shrink slices); else whole members, as many as fit both limits, each tile starting on a member
// boundary (high ranks at very few rows per member; Triton runs extra rank passes instead).
constexpr int64_t stacked_tile_rows(int block_rows, int64_t rows_per_member, int64_t members, int tile_members) {
  if (row_tile_members(rows_per_member, block_rows, members) <= tile_members) return block_rows;
  const int64_t whole = std::max<int64_t>(1, std::min<int64_t>(tile_members, block_rows / rows_per_member));
  return whole * rows_per_member;
}

// BM of the shared-input kernels: 64 rows once there are that many, or 16 when 64-row output tiles
// would leave SMs idle (batch-1 sizes): more, narrower CTAs, each computing the base once for every
// member, instead of member groups that would each recompute it. (Triton: the same rule over its
// power-of-two tiles.)
constexpr int shared_block_rows(int64_t rows, int64_t cols, int multiprocessors) {
  if (rows < kLargeBlockRows) return kSmallBlockRows;
  const int64_t tiles = policy_ceil_div(rows, kLargeBlockRows) * policy_ceil_div(cols, kFusedBlockCols);
  return tiles < multiprocessors ? kSmallBlockRows : kLargeBlockRows;
}

// Member groups of the shared-input forward (grid.y): 1 (x W0^T computed once per output tile)
// unless the CTA would need several passes over its members (`passes` > 1: more members than one
// pass's shared memory holds) and the output tiles leave SMs idle; then up to one group per pass,
// each computing x W0^T again. The shared-input dx always runs one group (its output sums members).
// (Triton: no member groups.)
constexpr int shared_member_groups(int64_t tiles, int64_t passes, int multiprocessors) {
  if (passes <= 1) return 1;
  return static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(passes, multiprocessors / std::max<int64_t>(tiles, 1))));
}

// Split-K of the fused kernels (grid.z): 1 while the CTAs (output tiles x member groups) fill half
// the SMs or more; else as many ranges of the reduction as keep the CTAs within one wave (the fused
// kernels run one CTA per SM: a second, partial wave would take as long as the first), each at least
// kMinInnerPerSplit long. The ranges are summed in order by the last CTA of each tile: deterministic,
// so also under torch.use_deterministic_algorithms. (Triton: the same function for its stacked kernel,
// counting 128-wide column tiles and 64-element K steps: kernels/launch_policy.py, with_k_splits.)
constexpr int fused_k_splits(int64_t programs, int64_t inner, int block_k, int multiprocessors) {
  const int64_t wanted = multiprocessors / std::max<int64_t>(programs, 1);
  const int64_t splits = std::min<int64_t>({wanted, inner / kMinInnerPerSplit, kMaxInnerSplits});
  if (splits <= 1) return 1;
  // Ranges are whole K steps; the last may be shorter, none empty.
  const int64_t per_split = policy_ceil_div(policy_ceil_div(inner, splits), block_k) * block_k;
  return static_cast<int>(policy_ceil_div(inner, per_split));
}

// Length of each range of a split-K over `inner` (a multiple of block_k).
constexpr int64_t fused_k_per_split(int64_t inner, int splits, int block_k) {
  return splits <= 1 ? inner : policy_ceil_div(policy_ceil_div(inner, splits), block_k) * block_k;
}

// Row ranges of the weight-gradient reduction (grid.z): 1 (each output written once, deterministic)
// unless the (column tile, member) CTAs alone leave SMs idle (fewer than two per SM) and every range
// keeps at least kGradMinRowsPerSplit rows; partial sums then meet in fp32 with atomics, so never
// under deterministic algorithms.
constexpr int grad_row_splits(int64_t rows, int64_t programs_per_split, int multiprocessors, bool deterministic) {
  if (deterministic) return 1;
  const int64_t wanted = policy_ceil_div(2 * int64_t{multiprocessors}, std::max<int64_t>(programs_per_split, 1));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({wanted, rows / kGradMinRowsPerSplit, kMaxGridYZ})));
}

// Rows each range of the weight-gradient reduction covers: an equal share rounded up to the quantum.
constexpr int64_t grad_rows_per_split(int64_t rows, int splits, int quantum = kGradRowQuantum) {
  return policy_ceil_div(policy_ceil_div(std::max<int64_t>(rows, 1), std::max(splits, 1)), quantum) * quantum;
}

}  // namespace lora_ensemble
