// Tile shapes and shared-memory layout of the fused GEMM + LoRA kernel (fused_lora_gemm.cuh): plain
// constexprs, so that the host-side planner (make_params.cuh) sizes grids and workspaces from the very
// numbers the kernel is compiled with.
//
// A CTA (256 threads, 8 warps) owns a BM x BN output tile, BN = 128, BM = 16 or 64 (launch_policy.cuh).
// Its K loop streams, per stage of a 3-stage cp.async pipeline:
//   in      [BM, BK]            x or dy rows (shared-input dx: one tile per member of the pass)
//   W       [BN, BK] / [BK, BN] the W0 strip of its columns (forward / dx)
//   shrink  [R, BK] / [BK, R]   per member of the pass: A[n] / B[n] (R = rank padded to 16..128)
// "Members of the pass" (kMembers at most): stacked, the members whose rows the row tile holds;
// shared input, the members whose x A[n]^T (dy[n] B[n]) the CTA accumulates in one pass. kMembers
// and BK are the largest that fit: the wanted member count (16 at BM = 16, the decode case; stacked
// at BM = 64, 4 up to rank tile 32 (16 rows per member) and 2 above; shared at BM = 64, 1) halved
// until the pipeline fits kPipeBudget and the epilogue the CTA limit, with BK = 32 (fp32: 16), else
// with BK = 16 (fp32: 8).
//
// Epilogue regions (byte offsets), after the K loop:
//   tensor cores: [ A: sLow fp32 [kLowMembers][BM][R], then the expand tiles of kExpandChunk members |
//                   B: the items' 16 x 16 scratch tiles, then hi, lo [kLowMembers][BM][R] 16-bit | C ]
//   SIMT (fp32):  [ A: sLow, then s * low | B: the expand tiles | C ]
// C, the fp32 output staging [BM][BN], is its own region only in the shared-input forward with several
// members (each member's tile is stored while later members are still to be expanded); otherwise it
// overlays everything. Past it all, the tensor cores' header: the member slot of each row as an fp32
// [BM][16] tile (read as a WMMA accumulator to select a member's rows), the item pairs and, per 16-row
// sub-tile, the pair of each member slot and the count of its members.
#pragma once

#include <type_traits>

#include "common.cuh"
#include "launch_policy.cuh"
#include "params.cuh"

namespace lora_ensemble {

// The pipeline's share of a CTA's shared memory (bytes).
constexpr int kPipeBudget = 96 * 1024;
// Dynamic shared memory a CTA may opt into on sm_86/sm_89 (99 KB), less room for the static
// __shared__ exponent of the fp16 rescale (common.cuh).
template <class T>
constexpr int kFusedSmemLimit = 101376 - (std::is_same_v<T, __half> ? 1024 : 0);

template <class T, bool kForward, bool kSharedInput, int kRankPad, int kBlockRows>
struct FusedTile {
  static_assert(kRankPad % 16 == 0 && kRankPad <= kMaxRank, "rank tile must be 16..128, a multiple of 16");
  static_assert(kBlockRows == kSmallBlockRows || kBlockRows == kLargeBlockRows, "row tile of 16 or 64 rows");
  static constexpr int kBM = kBlockRows;
  static constexpr bool kShared = kSharedInput;
  static constexpr int kBN = kFusedBlockCols, kThreads = 256, kWarps = 8, kStages = 3;
  static constexpr int kElem = static_cast<int>(sizeof(T));
  static constexpr int kPad = 16 / kElem;  // keeps rows 16-byte aligned and staggers banks
  static constexpr bool kTensorCore = Num<T>::kTensorCore;
  static constexpr int kLimit = kFusedSmemLimit<T>;
  // Shared-input dx sums dy[n] W0 over its members: one in tile per member.
  static constexpr bool kInPerMember = kShared && !kForward;
  static constexpr int kSubTiles = kBM / 16;
  static constexpr int kRankTiles = kRankPad / 16;

  // Sizes as functions of the member count and BK, for the fit below.
  static constexpr int in_bytes(int bk) { return round_up(kBM * (bk + kPad) * kElem, 128); }
  static constexpr int w_bytes(int bk) {
    return round_up(kForward ? kBN * (bk + kPad) * kElem : bk * (kBN + kPad) * kElem, 128);
  }
  static constexpr int shrink_bytes(int bk) {
    return round_up(kForward ? kRankPad * (bk + kPad) * kElem : bk * (kRankPad + kPad) * kElem, 128);
  }
  static constexpr int stage_bytes(int members, int bk) {
    return (kInPerMember ? members : 1) * in_bytes(bk) + w_bytes(bk) + members * shrink_bytes(bk);
  }
  // Low-rank work items of the tensor-core K loop: (16-row sub-tile, member) pairs x R/16 rank tiles,
  // one fp32 16 x 16 accumulator each, spread over the 8 warps. Stacked: a 16-row tile holds rows of
  // up to kMembers members; a 64-row tile holds kMembers at most (launch_policy.cuh), each member
  // boundary inside it adding a pair. Shared input: every sub-tile with every member.
  static constexpr int max_pairs(int members) {
    return kShared ? kSubTiles * members : (kBM == 16 ? members : kSubTiles + members - 1);
  }
  static constexpr int low_members(int members) { return kShared ? members : 1; }
  static constexpr int kLdLow = kRankPad + 4;  // fp32
  static constexpr int kLdSplit = kRankPad + kPad;
  static constexpr int kLdExpand = kForward ? kRankPad + kPad : kBN + kPad;
  static constexpr int kLdC = kBN + 4;
  static constexpr int kCBytes = round_up(kBM * kLdC * 4, 128);
  static constexpr int kExpandTileBytes = round_up((kForward ? kBN : kRankPad) * kLdExpand * kElem, 128);
  static constexpr int low_bytes(int members) { return round_up(low_members(members) * kBM * kLdLow * 4, 128); }
  static constexpr int split_bytes(int members) {  // hi or lo
    return kTensorCore ? round_up(low_members(members) * kBM * kLdSplit * kElem, 128) : 0;
  }
  static constexpr int scratch_bytes(int members) {
    return kTensorCore ? max_pairs(members) * kRankTiles * 16 * 16 * 4 : 0;
  }
  static constexpr bool own_c_region(int members) { return kShared && kForward && members > 1; }
  static constexpr int header_bytes(int members) {
    const int bytes = kBM * 16 * 4 + max_pairs(members) * 4 + kSubTiles * members * 4 + kSubTiles * 4 + 4;
    return kTensorCore ? round_up(bytes, 128) : 0;
  }
  // Region B of the tensor cores: the scratch, later hi and lo.
  static constexpr int split_or_scratch(int members) {
    return 2 * split_bytes(members) > scratch_bytes(members) ? 2 * split_bytes(members) : scratch_bytes(members);
  }
  // What stays beside the expand tiles while they are used.
  static constexpr int live_bytes(int members) {
    return (kTensorCore ? split_or_scratch(members) : low_bytes(members)) + (own_c_region(members) ? kCBytes : 0) +
           header_bytes(members);
  }
  static constexpr bool fits(int members, int bk) {
    const int one_chunk = kTensorCore && low_bytes(members) > kExpandTileBytes ? low_bytes(members) : kExpandTileBytes;
    return kStages * stage_bytes(members, bk) <= kPipeBudget &&
           live_bytes(members) + (kTensorCore ? one_chunk : kExpandTileBytes) <= kLimit;
  }
  static constexpr int kWantedMembers = kBM == 16 ? 16 : kShared ? 1 : kRankPad <= 32 ? 4 : 2;
  static constexpr int fitting_members(int bk) {
    int members = kWantedMembers;
    while (members > 1 && !fits(members, bk)) members /= 2;
    return members;
  }
  static constexpr int kLargeBK = kElem == 2 ? 32 : 16;
  static constexpr int kBK = fitting_members(kLargeBK) == kWantedMembers ? kLargeBK : kLargeBK / 2;
  static constexpr int kMembers = fitting_members(kBK);
  static_assert(fits(kMembers, kBK), "no member count fits the shared memory");
  static_assert(kShared || kMembers >= 2, "a stacked row tile may straddle a member boundary");

  // Pipeline stage: [in tiles | W | shrink slices], element strides.
  static constexpr int kLdIn = kBK + kPad;
  static constexpr int kLdW = kForward ? kBK + kPad : kBN + kPad;
  static constexpr int kLdShrink = kForward ? kBK + kPad : kRankPad + kPad;
  static constexpr int kInBytes = in_bytes(kBK);          // one in tile
  static constexpr int kWBytes = w_bytes(kBK);
  static constexpr int kShrinkBytes = shrink_bytes(kBK);  // one member's slice
  static constexpr int kInOffset = 0;
  static constexpr int kWOffset = (kInPerMember ? kMembers : 1) * kInBytes;
  static constexpr int kShrinkOffset = kWOffset + kWBytes;
  static constexpr int kStageBytes = stage_bytes(kMembers, kBK);
  static constexpr int kPipeBytes = kStages * kStageBytes;

  static constexpr int kMaxPairs = max_pairs(kMembers);
  static constexpr int kMaxItems = kMaxPairs * kRankTiles;
  static constexpr int kItemsPerWarp = ceil_div(kMaxItems, kWarps);

  // Epilogue.
  static constexpr int kLowMembers = low_members(kMembers);
  static constexpr int kLowBytes = low_bytes(kMembers);
  static constexpr int kSplitBytes = split_bytes(kMembers);
  static constexpr int kScratchBytes = scratch_bytes(kMembers);
  static constexpr bool kOwnCRegion = own_c_region(kMembers);
  static constexpr int kHeaderBytes = header_bytes(kMembers);
  // Expand tiles loaded at once: as many members as fit beside what stays live.
  static constexpr int kChunkRoom = (kLimit - live_bytes(kMembers)) / kExpandTileBytes;
  static constexpr int kExpandChunk = kChunkRoom < 1 ? 1 : min_int(kMembers, kChunkRoom);
  static constexpr int kExpandChunkBytes = kExpandChunk * kExpandTileBytes;
  static constexpr int kRegionA = kTensorCore && kExpandChunkBytes > kLowBytes ? kExpandChunkBytes : kLowBytes;
  static constexpr int kRegionB = kTensorCore ? split_or_scratch(kMembers) : kExpandChunkBytes;
  static constexpr int kLowOffset = 0;
  static constexpr int kExpandOffset = kTensorCore ? 0 : kRegionA;
  static constexpr int kScratchOffset = kRegionA;  // consumed before hi / lo are written
  static constexpr int kHiOffset = kRegionA;
  static constexpr int kLoOffset = kHiOffset + kSplitBytes;
  static constexpr int kCOffset = kOwnCRegion ? kRegionA + kRegionB : 0;
  static constexpr int kEpilogueBytes = kRegionA + kRegionB + (kOwnCRegion ? kCBytes : 0);

  // Header (tensor cores), past everything.
  static constexpr int kBodyBytes = round_up(max3(kPipeBytes, kEpilogueBytes, kCBytes), 128);
  static constexpr int kMemberTileOffset = kBodyBytes;
  static constexpr int kPairOffset = kMemberTileOffset + kBM * 16 * 4;
  static constexpr int kPairOfOffset = kPairOffset + kMaxPairs * 4;
  static constexpr int kSubTileCountOffset = kPairOfOffset + kSubTiles * kMembers * 4;
  static constexpr int kCountOffset = kSubTileCountOffset + kSubTiles * 4;
  static constexpr int kSmemBytes = kBodyBytes + kHeaderBytes;
#ifndef LORA_ENSEMBLE_TILE_REPORT
  static_assert(kSmemBytes <= kLimit, "fused tile over the 99 KB a CTA may use on sm_86/sm_89");
#endif
};

// The shape numbers the planner needs, for a tile chosen at run time.
struct FusedTileShape {
  int block_rows;    // BM
  int block_cols;    // BN
  int block_k;       // BK
  int tile_members;  // kMembers
};

template <class T, bool kForward, bool kShared, int kRankPad, int kBM>
constexpr FusedTileShape fused_tile_shape_of() {
  using Tile = FusedTile<T, kForward, kShared, kRankPad, kBM>;
  return {kBM, Tile::kBN, Tile::kBK, Tile::kMembers};
}

template <class T, bool kForward, bool kShared, int kBM>
constexpr FusedTileShape fused_tile_shape_rank(int rank_pad) {
  return rank_pad == 16   ? fused_tile_shape_of<T, kForward, kShared, 16, kBM>()
         : rank_pad == 32 ? fused_tile_shape_of<T, kForward, kShared, 32, kBM>()
         : rank_pad == 64 ? fused_tile_shape_of<T, kForward, kShared, 64, kBM>()
                          : fused_tile_shape_of<T, kForward, kShared, 128, kBM>();
}

template <class T, bool kForward, bool kShared>
constexpr FusedTileShape fused_tile_shape_rows(int rank_pad, int block_rows) {
  return block_rows == kSmallBlockRows ? fused_tile_shape_rank<T, kForward, kShared, kSmallBlockRows>(rank_pad)
                                       : fused_tile_shape_rank<T, kForward, kShared, kLargeBlockRows>(rank_pad);
}

template <class T>
constexpr FusedTileShape fused_tile_shape(bool forward, bool shared, int rank_pad, int block_rows) {
  return forward ? (shared ? fused_tile_shape_rows<T, true, true>(rank_pad, block_rows)
                           : fused_tile_shape_rows<T, true, false>(rank_pad, block_rows))
                 : (shared ? fused_tile_shape_rows<T, false, true>(rank_pad, block_rows)
                           : fused_tile_shape_rows<T, false, false>(rank_pad, block_rows));
}

}  // namespace lora_ensemble
