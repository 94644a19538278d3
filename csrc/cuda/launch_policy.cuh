// Launch policies of the CUDA kernels, in one place: the row tile of the fused kernels, how the
// stacked rows are cut into row tiles, member groups of the shared-input forward, split-K of the
// fused kernels, and the row split of the weight gradients. Plain host functions of sizes and the
// GPU's SM count (no CUDA types), so that make_params.cuh, the host emulation and the test that ties
// them to the Triton policies (lora_ensemble/kernels/launch_policy.py, same names) all call these.
//
// Worked example, Llama-7B q_proj at decode (16 members x 1 row, d = k = 4096, r = 16, 132 SMs):
// fused_block_rows(1) = 16, and a 16-row tile can hold the rows of 16 members (fused_tile.cuh), so
// stacked_tile_rows = 16: one row tile of all 16 rows, W0 read once. 32 column tiles on 132 SMs:
// fused_k_splits(32, 4096, 32, 132) = 5 ranges of 832 (26 K steps each), 160 CTAs.
#pragma once

#include <algorithm>
#include <cstdint>

namespace lora_ensemble {

// Row tiles of the fused kernels: 16 rows (the WMMA minimum: decode and small batches), or 64.
constexpr int kSmallBlockRows = 16;
constexpr int kLargeBlockRows = 64;
// Output columns of a fused CTA (BN) and rows of a weight-gradient CTA (BJ).
constexpr int kFusedBlockCols = 128;
constexpr int kGradBlockCols = 128;
// Split-K of the fused kernels: each range reduces at least this many elements, at most this many ranges.
constexpr int kMinInnerPerSplit = 128;
constexpr int kMaxInnerSplits = 16;
// Weight gradients: split rows only when every range keeps at least this many; a range is a multiple
// of this many rows (the kernel's row step, BKM = 32; the Triton kernel's is 16).
constexpr int kMinRowsPerSplit = 512;
constexpr int kRowSplitQuantum = 32;
// grid.y and grid.z limit.
constexpr int64_t kMaxGridYZ = 65535;

constexpr int64_t policy_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The rank tile the kernels are instantiated for: r padded to 16, 32, 64 or 128.
constexpr int rank_tile(int64_t rank) { return rank <= 16 ? 16 : rank <= 32 ? 32 : rank <= 64 ? 64 : 128; }

// BM of the fused kernels for `rows_per_member` rows per member (stacked) or shared rows: 64 when
// there are at least 64 (a 64-row stacked tile then holds at most two members' rows), else 16.
constexpr int fused_block_rows(int64_t rows_per_member) {
  return rows_per_member >= kLargeBlockRows ? kLargeBlockRows : kSmallBlockRows;
}

// The most members whose rows a window of `block_rows` consecutive stacked rows can hold.
constexpr int64_t members_per_window(int64_t block_rows, int64_t rows_per_member, int64_t members) {
  return std::min<int64_t>(members, policy_ceil_div(block_rows - 1, rows_per_member) + 1);
}

// The most members whose rows one row tile of `tile_rows` rows holds: tiles of whole members hold
// tile_rows / M each (the tiles start on member boundaries); others as many as any such window.
constexpr int64_t stacked_members_per_tile(int64_t tile_rows, int64_t rows_per_member, int64_t members) {
  return tile_rows % rows_per_member == 0 ? std::min<int64_t>(members, tile_rows / rows_per_member)
                                          : members_per_window(tile_rows, rows_per_member, members);
}

// Rows of the stacked N * M rows one row tile covers. The plain GEMM tiling (block_rows rows from row
// 0, tiles crossing member boundaries) while a window holds at most `tile_members` members (the
// kernel's shared-memory room for their shrink slices); else whole members, as many as fit both
// limits, so a tile starts on a member boundary (high ranks at very few rows per member).
constexpr int64_t stacked_tile_rows(int block_rows, int64_t rows_per_member, int64_t members, int tile_members) {
  if (stacked_members_per_tile(block_rows, rows_per_member, members) <= tile_members) return block_rows;
  const int64_t whole = std::max<int64_t>(1, std::min<int64_t>(tile_members, block_rows / rows_per_member));
  return whole * rows_per_member;
}

// Member groups of the shared-input forward (grid.y): 1 (x W0^T computed once per output tile)
// unless the CTA would need several passes over its members (`chunks` > 1: more members than one
// pass's shared memory holds) and the output tiles leave SMs idle; then up to one group per pass,
// each computing x W0^T again. The shared-input dx always runs one group (its output sums members).
constexpr int shared_member_groups(int64_t tiles, int64_t chunks, int multiprocessors) {
  if (chunks <= 1) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(chunks, multiprocessors / std::max<int64_t>(tiles, 1))));
}

// Split-K of the fused kernels (grid.z): 1 while the CTAs (output tiles x member groups) fill the
// GPU; else enough ranges of the reduction to occupy every SM, each at least kMinInnerPerSplit long.
// The ranges are summed in order by the last CTA of each tile: deterministic, so also under
// torch.use_deterministic_algorithms.
constexpr int fused_k_splits(int64_t programs, int64_t inner, int block_k, int multiprocessors) {
  const int64_t wanted = policy_ceil_div(multiprocessors, std::max<int64_t>(programs, 1));
  int64_t splits = std::min<int64_t>({wanted, inner / kMinInnerPerSplit, kMaxInnerSplits});
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
// unless the (column tile, member) CTAs alone leave SMs idle and every range keeps at least
// kMinRowsPerSplit rows; partial sums then meet in fp32 with atomics, so never under deterministic
// algorithms.
constexpr int grad_row_splits(int64_t rows, int64_t programs_per_split, int multiprocessors, bool deterministic) {
  if (deterministic) return 1;
  const int64_t wanted = policy_ceil_div(2 * int64_t{multiprocessors}, std::max<int64_t>(programs_per_split, 1));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({wanted, rows / kMinRowsPerSplit, kMaxGridYZ})));
}

// Rows each range of the weight-gradient reduction covers.
constexpr int64_t grad_rows_per_split(int64_t rows, int splits) {
  return splits > 1 ? policy_ceil_div(policy_ceil_div(rows, splits), kRowSplitQuantum) * kRowSplitQuantum
                    : std::max<int64_t>(rows, 1);
}

}  // namespace lora_ensemble
