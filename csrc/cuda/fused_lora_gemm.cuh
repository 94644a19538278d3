// Fused GEMM + LoRA: the forward and the input gradient of a LoRA-Ensemble linear layer, one launch.
//
//   forward      out[n] = x[n] W0^T + b + s (x[n] A[n]^T) B[n]^T      low[n] = x[n] A[n]^T   (fp32)
//   backward dx  out[n] = dy[n] W0  +     s (dy[n] B[n]) A[n]          low[n] = dy[n] B[n]
// Without W0 (a base layer the kernel cannot read, e.g. a quantized one) the W0 term is left out,
// and the forward adds the given base output base[n] at the store instead.
// Generic form (csrc/cuda/params.cuh): out = in W + s (in shrink) expand, low = in shrink, with `inner`
// the reduction length.
//
// Stacked rows are one matrix (Punica's SGMV / S-LoRA's MBGMV, with the base GEMM fused in). The
// N * M rows of `in` (member-major) are cut into row tiles as a plain GEMM over N * M rows would cut
// them: a row tile may hold the rows of several members. A CTA owns a BM x BN output tile (BN = 128,
// BM = 16 or 64, fused_tile.cuh; grid.x = row tile * column tiles + column tile) and computes its
// in W0 once, loading each W0 strip once per row tile of the whole stacked batch; the rank-r part of
// each row uses that row's member. Its K loop streams, per stage, the in tile, the W0 strip and the
// shrink slices (A[n] / B[n], rank padded to R = 16..128) of every member the tile holds; the
// tensor-core shrink accumulates one 16 x 16 fp32 tile per (16-row sub-tile, member, rank tile)
// item, the items spread over the 8 warps, and keeps of each item only the rows of its member
// (exact: another member's factors never meet a row, so NaN or Inf in one member's factors stays in
// that member's rows). The epilogue writes low (column tile 0), splits s low into 16-bit hi + lo parts
// (hi + lo carries ~16 mantissa bits, so the rank-r product keeps near-fp32 accuracy on tensor
// cores; see common.cuh for fp16's range), loads the expand tiles (B[n] / A[n]) of up to
// kExpandChunk members at once and adds each member's (hi + lo) expand to its own rows (a member id
// tile, read as a WMMA accumulator, selects them), then stores through shared memory with the bias,
// masked at the edges. fp16/bf16 use WMMA 16x16x16 tiles (warp tile 32 x 32 at BM = 64, 16 x 16 at
// BM = 16); fp32 uses SIMT FMAs, exact fp32 (no tf32), each thread reading its own rows' member.
//
// Tile choice (launch_policy.cuh): BM = 64 when a 64-row tile spans no more members than it holds
// shrink slices for (4 up to rank tile 32, else 2: from 16-22 rows per member on; where M is a
// multiple of 64 the tiles fall on member boundaries and nothing is lost), else BM = 16, the WMMA
// minimum: at decode (16 members x 1 row) one row tile holds all 16 rows, so W0 is read once, not
// once per member. A 16-row tile holds up to kMembers members (16 at rank tiles 16 and 32, 8 at 64,
// 4 at 128: their shrink slices must fit a stage); at higher ranks with fewer rows per member a row
// tile is whole members (W0 read once per kMembers members). Where the output tiles leave SMs idle
// (decode, small batches) the reduction is split in ranges (grid.z, split-K): each CTA writes fp32
// partial sums of in W0 and in shrink, and the CTA of a tile that arrives last adds them up in range
// order (deterministic), then runs the epilogue alone.
//
// Re-reads, per call (the traffic test, tests/test_cuda_traffic.py, counts them under the host
// emulation; its budget is tests/traffic_budget.py):
//   W0: once per row tile (= a plain GEMM over the N * M rows with the same BM);
//   in: once per column tile (as a plain GEMM);
//   shrink (A; dx: B): once per (row tile, column tile, member the row tile holds), at most
//   col_tiles * (row_tiles + N - 1) * r * inner elements; expand (B; dx: A) once per (row tile, member),
//   at most (row_tiles + N - 1) * cols * r. The shrink's re-read per column tile is the cost of fusing
//   (x A^T is recomputed per column tile): at decode (r = 16, 16 members, k = 4096) 2x W0's bytes,
//   from L2 (A is 2 MB).
//
// Shared input (a template flag): one in tile serves every member. A CTA loops over its members in
// passes of kMembers; each pass's K loop accumulates x A[n]^T (dy[n] B[n]) for all of them together.
// Forward: x W0^T is computed once, in the first pass, and kept; grid.y = member groups (1 unless the
// CTA needs several passes and the tiles leave SMs idle). Backward dx: dy[n] W0 + s dyb[n] A[n] of every
// member accumulated into one tile (dx is summed over members; one in tile per member per stage); one
// group, so no atomics: small batches keep the GPU busy with split-K instead.
#pragma once

#ifndef LORA_ENSEMBLE_HOST_EMULATION
#include <c10/cuda/CUDAException.h>
#endif

#include <type_traits>

#include "common.cuh"
#include "fused_tile.cuh"
#include "launch_policy.cuh"
#include "params.cuh"

namespace lora_ensemble {

// What one pass of a CTA works on (uniform over the CTA).
struct FusedTileWork {
  int row0, row_end;    // rows [row0, row_end) of `in` (stacked: of the N * M rows; shared: of the M)
  int col0, tile_col;
  int k_begin, k_end;   // the reduction range of this split
  int rows_per_member;  // M
  int first_member;     // member slot j is member first_member + j
  int slots;            // members of this pass
  int pairs;            // (16-row sub-tile, member slot) pairs with rows (tensor cores)

  // Stacked: the member slot of tile row r (-1 past the tile's rows).
  __device__ int slot_of(int r) const {
    const int row = row0 + r;
    return row < row_end ? row / rows_per_member - first_member : -1;
  }
};

// The tensor cores' header tables (fused_tile.cuh).
template <class Tile>
struct FusedHeader {
  float* member_tile;    // [BM][16]: the slot of each row as a float (-1: no row)
  int* pairs;            // [kMaxPairs]: sub-tile << 8 | slot (stacked)
  int* pair_of;          // [kSubTiles][kMembers]: the pair of (sub-tile, slot), -1 if none (stacked)
  int* subtile_members;  // [kSubTiles]: members with rows in the sub-tile (stacked)
  int* count;
  __device__ explicit FusedHeader(unsigned char* smem)
      : member_tile(reinterpret_cast<float*>(smem + Tile::kMemberTileOffset)),
        pairs(reinterpret_cast<int*>(smem + Tile::kPairOffset)),
        pair_of(reinterpret_cast<int*>(smem + Tile::kPairOfOffset)),
        subtile_members(reinterpret_cast<int*>(smem + Tile::kSubTileCountOffset)),
        count(reinterpret_cast<int*>(smem + Tile::kCountOffset)) {}

  // (sub-tile, slot) of pair p.
  __device__ void pair(int p, const FusedTileWork& w, int& tm, int& slot) const {
    if constexpr (Tile::kShared) {
      tm = p / w.slots;
      slot = p % w.slots;
    } else {
      tm = pairs[p] >> 8;
      slot = pairs[p] & 0xFF;
    }
  }
};

// Fills the header for a pass (stacked tensor cores; the others need none) and returns the number
// of (sub-tile, slot) pairs; starts and ends with a CTA barrier.
template <class Tile>
__device__ int build_header(const FusedHeader<Tile>& h, const FusedTileWork& w) {
  __syncthreads();  // the previous pass is done with the header
  if constexpr (Tile::kShared || !Tile::kTensorCore) {
    return ceil_div(w.row_end - w.row0, 16) * w.slots;
  } else {
    for (int e = threadIdx.x; e < Tile::kBM * 16; e += Tile::kThreads) {
      h.member_tile[e] = static_cast<float>(w.slot_of(e / 16));
    }
    if (threadIdx.x == 0) {
      int count = 0;
      for (int tm = 0; tm < Tile::kSubTiles; ++tm) {
        for (int j = 0; j < Tile::kMembers; ++j) h.pair_of[tm * Tile::kMembers + j] = -1;
        const int first_row = w.row0 + 16 * tm;
        if (first_row >= w.row_end) {
          h.subtile_members[tm] = 0;
          continue;
        }
        const int last_row = min_int(first_row + 16, w.row_end) - 1;
        const int lo = first_row / w.rows_per_member - w.first_member;
        const int hi = last_row / w.rows_per_member - w.first_member;
        h.subtile_members[tm] = hi - lo + 1;
        for (int j = lo; j <= hi; ++j) {
          h.pair_of[tm * Tile::kMembers + j] = count;
          h.pairs[count++] = tm << 8 | j;
        }
      }
      *h.count = count;
    }
    __syncthreads();
    return *h.count;
  }
}

// Tensor-core math (fp16/bf16). Output: warp w owns rows kWarpRows (w / kWarpsN) .. + kWarpRows and
// columns kWarpCols (w % kWarpsN) .. + kWarpCols. Low-rank items i = w, w + 8, ... (item = pair *
// R/16 + rank tile), one accumulator each.
template <class T, bool kForward, bool kShared, int kRankPad, int kBM>
struct WmmaMath {
  using Tile = FusedTile<T, kForward, kShared, kRankPad, kBM>;
  static constexpr int kWarpRows = kBM == 16 ? 16 : 32;
  static constexpr int kWarpsM = kBM / kWarpRows, kWarpsN = Tile::kWarps / kWarpsM;
  static constexpr int kWarpCols = Tile::kBN / kWarpsN;
  static constexpr int kFragsM = kWarpRows / 16, kFragsN = kWarpCols / 16;
  // forward: W, shrink and expand are stored [n][k] (col-major B operands); backward dx: [k][n].
  using LayoutB = std::conditional_t<kForward, wmma::col_major, wmma::row_major>;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

  struct Acc {
    FragC f[kFragsM][kFragsN];
  };
  struct LowAcc {
    FragC f[Tile::kItemsPerWarp];
  };

  int warp, warp_m, warp_n;

  __device__ WmmaMath() : warp(threadIdx.x / 32), warp_m(warp / kWarpsN), warp_n(warp % kWarpsN) {}

  __device__ static void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < kFragsM; ++i)
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) wmma::fill_fragment(acc.f[i][j], 0.0f);
  }
  __device__ static void zero(LowAcc& acc) {
#pragma unroll
    for (int t = 0; t < Tile::kItemsPerWarp; ++t) wmma::fill_fragment(acc.f[t], 0.0f);
  }

  // B-operand tile at (k offset kk, n offset nn) of a tile stored with leading dimension ld.
  __device__ static const T* b_tile(const T* s, int ld, int kk, int nn) {
    return kForward ? s + nn * ld + kk : s + kk * ld + nn;
  }

  // acc += (sum over the in tiles t < in_tiles of sIn[t]) sW over one BK slice.
  __device__ void mma_base(Acc& acc, const T* s_in, int in_stride, int in_tiles, const T* s_w) const {
#pragma unroll
    for (int kk = 0; kk < Tile::kBK; kk += 16) {
      FragB b[kFragsN];
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) {
        wmma::load_matrix_sync(b[j], b_tile(s_w, Tile::kLdW, kk, warp_n * kWarpCols + j * 16), Tile::kLdW);
      }
      for (int t = 0; t < in_tiles; ++t) {
        FragA a[kFragsM];
#pragma unroll
        for (int i = 0; i < kFragsM; ++i) {
          wmma::load_matrix_sync(a[i], s_in + t * in_stride + (warp_m * kWarpRows + i * 16) * Tile::kLdIn + kk,
                                 Tile::kLdIn);
        }
#pragma unroll
        for (int i = 0; i < kFragsM; ++i)
#pragma unroll
          for (int j = 0; j < kFragsN; ++j) wmma::mma_sync(acc.f[i][j], a[i], b[j], acc.f[i][j]);
      }
    }
  }

  // Each of this warp's items: low += sIn(sub-tile rows) sShrink[slot](rank tile) over one BK slice.
  __device__ void mma_items(LowAcc& low, const T* s_in, int in_stride, const T* s_shrink, const FusedHeader<Tile>& h,
                            const FusedTileWork& w) const {
    const int items = w.pairs * Tile::kRankTiles;
#pragma unroll
    for (int kk = 0; kk < Tile::kBK; kk += 16) {
#pragma unroll
      for (int u = 0; u < Tile::kItemsPerWarp; ++u) {
        const int item = warp + u * Tile::kWarps;
        if (item < items) {
          int tm, slot;
          h.pair(item / Tile::kRankTiles, w, tm, slot);
          const int tq = item % Tile::kRankTiles;
          FragA a;
          FragB q;
          wmma::load_matrix_sync(a, s_in + (Tile::kInPerMember ? slot * in_stride : 0) + tm * 16 * Tile::kLdIn + kk,
                                 Tile::kLdIn);
          wmma::load_matrix_sync(q, b_tile(s_shrink + slot * (Tile::kShrinkBytes / Tile::kElem), Tile::kLdShrink, kk,
                                           tq * 16), Tile::kLdShrink);
          wmma::mma_sync(low.f[u], a, q, low.f[u]);
        }
      }
    }
  }

  // Each item's accumulator to its 16 x 16 fp32 scratch tile.
  __device__ void store_items(const LowAcc& low, float* s_scratch, const FusedTileWork& w) const {
    const int items = w.pairs * Tile::kRankTiles;
#pragma unroll
    for (int u = 0; u < Tile::kItemsPerWarp; ++u) {
      const int item = warp + u * Tile::kWarps;
      if (item < items) wmma::store_matrix_sync(s_scratch + item * 256, low.f[u], 16, wmma::mem_row_major);
    }
  }

  // acc += (hi + lo) expand over the rank for output fragment (i, j) of this warp.
  __device__ void expand_fragment(FragC& acc, int i, int j, const T* s_hi, const T* s_lo, const T* s_expand) const {
    const int row = (warp_m * kFragsM + i) * 16;
#pragma unroll
    for (int kk = 0; kk < kRankPad; kk += 16) {
      FragA hi, lo;
      FragB q;
      wmma::load_matrix_sync(hi, s_hi + row * Tile::kLdSplit + kk, Tile::kLdSplit);
      wmma::load_matrix_sync(lo, s_lo + row * Tile::kLdSplit + kk, Tile::kLdSplit);
      wmma::load_matrix_sync(q, b_tile(s_expand, Tile::kLdExpand, kk, warp_n * kWarpCols + j * 16), Tile::kLdExpand);
      wmma::mma_sync(acc, hi, q, acc);
      wmma::mma_sync(acc, lo, q, acc);
    }
  }

  // acc += (hi + lo) expand of member slot `slot` on that member's rows (stacked), or on every row
  // (shared input: hi / lo are that member's).
  __device__ void expand_member(Acc& acc, const T* s_hi, const T* s_lo, const T* s_expand, int slot,
                                const FusedHeader<Tile>& h) const {
#pragma unroll
    for (int i = 0; i < kFragsM; ++i) {
      const int tm = warp_m * kFragsM + i;
      bool alone = true;
      if constexpr (!kShared) {
        if (h.pair_of[tm * Tile::kMembers + slot] < 0) continue;  // no row of this member here
        alone = h.subtile_members[tm] == 1;
      }
      if (alone) {
#pragma unroll
        for (int j = 0; j < kFragsN; ++j) expand_fragment(acc.f[i][j], i, j, s_hi, s_lo, s_expand);
      } else {  // rows of several members: add this member's product to its rows only
        FragC member;
        wmma::load_matrix_sync(member, h.member_tile + tm * 16 * 16, 16, wmma::mem_row_major);
#pragma unroll
        for (int j = 0; j < kFragsN; ++j) {
          FragC part;
          wmma::fill_fragment(part, 0.0f);
          expand_fragment(part, i, j, s_hi, s_lo, s_expand);
          for (int t = 0; t < part.num_elements; ++t) {
            if (member.x[t] == static_cast<float>(slot)) acc.f[i][j].x[t] += part.x[t];
          }
        }
      }
    }
  }

  // acc *= factor (a power of two: exact).
  __device__ static void scale(Acc& acc, float factor) {
#pragma unroll
    for (int i = 0; i < kFragsM; ++i)
#pragma unroll
      for (int j = 0; j < kFragsN; ++j)
#pragma unroll
        for (int t = 0; t < acc.f[i][j].num_elements; ++t) acc.f[i][j].x[t] *= factor;
  }

  __device__ void store(const Acc& acc, float* s_c) const {
#pragma unroll
    for (int i = 0; i < kFragsM; ++i)
#pragma unroll
      for (int j = 0; j < kFragsN; ++j)
        wmma::store_matrix_sync(s_c + (warp_m * kWarpRows + i * 16) * Tile::kLdC + warp_n * kWarpCols + j * 16,
                                acc.f[i][j], Tile::kLdC, wmma::mem_row_major);
  }

  __device__ void load(Acc& acc, const float* s_c) const {
#pragma unroll
    for (int i = 0; i < kFragsM; ++i)
#pragma unroll
      for (int j = 0; j < kFragsN; ++j)
        wmma::load_matrix_sync(acc.f[i][j],
                               s_c + (warp_m * kWarpRows + i * 16) * Tile::kLdC + warp_n * kWarpCols + j * 16,
                               Tile::kLdC, wmma::mem_row_major);
  }
};

// SIMT math (fp32): thread t owns output rows (t / 16) BM/16 .. + BM/16 and columns t % 16 + 16 j (j < 8),
// and the low-rank entries of row t / (256 / BM), columns t % (256 / BM) + (256 / BM) c, for its row's
// member (stacked) or for every member of the pass (shared input).
template <bool kForward, bool kShared, int kRankPad, int kBM>
struct SimtMath {
  using Tile = FusedTile<float, kForward, kShared, kRankPad, kBM>;
  static constexpr int kRowsPerThread = kBM / 16, kColsPerThread = 8;
  static constexpr int kLowThreadsPerRow = Tile::kThreads / kBM;
  static constexpr int kLowPerThread = kRankPad / kLowThreadsPerRow;
  static constexpr int kLowSlots = kShared ? Tile::kMembers : 1;
  static_assert(Tile::kBN == 16 * kColsPerThread && Tile::kThreads == 256,
                "thread layout assumes BN = 128, 256 threads");

  struct Acc {
    float v[kRowsPerThread][kColsPerThread];
  };
  struct LowAcc {
    float v[kLowSlots][kLowPerThread];
  };

  int row, col, low_row, low_col;

  __device__ SimtMath()
      : row((threadIdx.x / 16) * kRowsPerThread),
        col(threadIdx.x % 16),
        low_row(threadIdx.x / kLowThreadsPerRow),
        low_col(threadIdx.x % kLowThreadsPerRow) {}

  __device__ static void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) acc.v[i][j] = 0.0f;
  }
  __device__ static void zero(LowAcc& acc) {
#pragma unroll
    for (int j = 0; j < kLowSlots; ++j)
#pragma unroll
      for (int c = 0; c < kLowPerThread; ++c) acc.v[j][c] = 0.0f;
  }

  // Element (k index kk, n index nn) of a B-side tile (W, shrink or expand) with leading dimension ld.
  __device__ static float b_at(const float* s, int ld, int kk, int nn) {
    return kForward ? s[nn * ld + kk] : s[kk * ld + nn];
  }

  __device__ void mma_base(Acc& acc, const float* s_in, int in_stride, int in_tiles, const float* s_w) const {
#pragma unroll 4
    for (int kk = 0; kk < Tile::kBK; ++kk) {
      float a[kRowsPerThread], b[kColsPerThread];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        a[i] = 0.0f;
        for (int t = 0; t < in_tiles; ++t) a[i] += s_in[t * in_stride + (row + i) * Tile::kLdIn + kk];
      }
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) b[j] = b_at(s_w, Tile::kLdW, kk, col + 16 * j);
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
        for (int j = 0; j < kColsPerThread; ++j) acc.v[i][j] = fmaf(a[i], b[j], acc.v[i][j]);
    }
  }

  __device__ void mma_items(LowAcc& low, const float* s_in, int in_stride, const float* s_shrink,
                            const FusedHeader<Tile>&, const FusedTileWork& w) const {
    constexpr int kShrinkStride = Tile::kShrinkBytes / 4;
#pragma unroll
    for (int j = 0; j < kLowSlots; ++j) {
      // stacked: the row's own member; shared input: member j of the pass
      const int slot = kShared ? j : w.slot_of(low_row);
      if (kShared ? j >= w.slots : slot < 0) continue;
      const float* in_row = s_in + (Tile::kInPerMember ? slot * in_stride : 0) + low_row * Tile::kLdIn;
      const float* shrink = s_shrink + slot * kShrinkStride;
#pragma unroll 4
      for (int kk = 0; kk < Tile::kBK; ++kk) {
        const float a = in_row[kk];
#pragma unroll
        for (int c = 0; c < kLowPerThread; ++c) {
          low.v[j][c] = fmaf(a, b_at(shrink, Tile::kLdShrink, kk, low_col + kLowThreadsPerRow * c), low.v[j][c]);
        }
      }
    }
  }

  // low to s_low [kLowSlots][BM][R] (zero for rows of no member and for unused member slots).
  __device__ void store_low(const LowAcc& low, float* s_low, const FusedTileWork& w) const {
#pragma unroll
    for (int j = 0; j < kLowSlots; ++j) {
      const bool valid = kShared ? j < w.slots : w.slot_of(low_row) >= 0;
#pragma unroll
      for (int c = 0; c < kLowPerThread; ++c) {
        s_low[(j * kBM + low_row) * Tile::kLdLow + low_col + kLowThreadsPerRow * c] = valid ? low.v[j][c] : 0.0f;
      }
    }
  }

  // acc += s_low expand of member slot `slot` (s_low holds s * low) on that member's rows (stacked), or
  // on every row (shared input: s_low is that member's).
  __device__ void expand_member(Acc& acc, const float* s_low, const float* s_expand, int slot,
                                const FusedTileWork& w) const {
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      if (!kShared && w.slot_of(row + i) != slot) continue;
      const float* low_row_ptr = s_low + (row + i) * Tile::kLdLow;
#pragma unroll 4
      for (int kk = 0; kk < kRankPad; ++kk) {
        const float a = low_row_ptr[kk];
#pragma unroll
        for (int j = 0; j < kColsPerThread; ++j) {
          acc.v[i][j] = fmaf(a, b_at(s_expand, Tile::kLdExpand, kk, col + 16 * j), acc.v[i][j]);
        }
      }
    }
  }

  __device__ static void scale(Acc& acc, float factor) {
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) acc.v[i][j] *= factor;
  }

  __device__ void store(const Acc& acc, float* s_c) const {
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) s_c[(row + i) * Tile::kLdC + col + 16 * j] = acc.v[i][j];
  }

  __device__ void load(Acc& acc, const float* s_c) const {
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) acc.v[i][j] = s_c[(row + i) * Tile::kLdC + col + 16 * j];
  }
};

template <class T, bool kForward, bool kShared, int kRankPad, int kBM>
using FusedMath = std::conditional_t<Num<T>::kTensorCore, WmmaMath<T, kForward, kShared, kRankPad, kBM>,
                                     SimtMath<kForward, kShared, kRankPad, kBM>>;

// The K loop of one pass over the split's reduction range: base += in W (when with_base) and the
// low-rank items += in shrink[slot], through the multi-stage cp.async pipeline. Starts and ends with a
// CTA barrier.
template <class T, bool kForward, bool kShared, int kRankPad, int kBM, class Math>
__device__ void fused_mainloop(const FusedLoraGemmParams<T>& p, const FusedTileWork& w, bool with_base,
                               const Math& math, typename Math::Acc& base, typename Math::LowAcc& low,
                               const FusedHeader<FusedTile<T, kForward, kShared, kRankPad, kBM>>& h,
                               unsigned char* smem) {
  using Tile = FusedTile<T, kForward, kShared, kRankPad, kBM>;
  constexpr int BM = kBM, BN = Tile::kBN, BK = Tile::kBK, R = kRankPad, TH = Tile::kThreads;
  constexpr int kInStride = Tile::kInBytes / Tile::kElem, kShrinkStride = Tile::kShrinkBytes / Tile::kElem;
  constexpr int kMaxInTiles = Tile::kInPerMember ? Tile::kMembers : 1;
  // in: stacked rows [N * M, inner]; shared forward x [M, inner]; shared dx dy[n] [M, inner] per member.
  const int64_t in_member_stride = static_cast<int64_t>(p.rows) * p.inner;
  const T* in = p.in + (Tile::kInPerMember ? w.first_member * in_member_stride : 0);
  const int in_tiles = Tile::kInPerMember ? w.slots : 1;
  const int64_t shrink_member_stride = static_cast<int64_t>(p.rank) * p.inner;
  const T* shrink = p.shrink + w.first_member * shrink_member_stride;
  auto stage = [&](int s) { return smem + s * Tile::kStageBytes; };
  auto s_in = [&](int s) { return reinterpret_cast<T*>(stage(s) + Tile::kInOffset); };
  auto s_w = [&](int s) { return reinterpret_cast<T*>(stage(s) + Tile::kWOffset); };
  auto s_shrink = [&](int s) { return reinterpret_cast<T*>(stage(s) + Tile::kShrinkOffset); };

  auto issue = [&](int kt) {
    const int s = kt % Tile::kStages, k0 = w.k_begin + kt * BK;
    load_tiles<T, BM, BK, TH, kMaxInTiles>(s_in(s), kInStride, Tile::kLdIn, in, in_member_stride, p.inner, w.row_end,
                                           w.k_end, w.row0, k0, in_tiles, p.vec_in);
    if constexpr (kForward) {
      // W0 [k, d] rows are output columns; A[n] [r, d] rows are rank columns.
      if (with_base) {
        load_tile<T, BN, BK, TH>(s_w(s), Tile::kLdW, p.weight, p.inner, p.cols, w.k_end, w.col0, k0, p.vec_weight);
      }
      load_tiles<T, R, BK, TH, Tile::kMembers>(s_shrink(s), kShrinkStride, Tile::kLdShrink, shrink,
                                               shrink_member_stride, p.inner, p.rank, w.k_end, 0, k0, w.slots,
                                               p.vec_shrink);
    } else {
      // W0 [k, d] rows are the reduction; B[n] [k, r] rows are the reduction.
      if (with_base) {
        load_tile<T, BK, BN, TH>(s_w(s), Tile::kLdW, p.weight, p.cols, w.k_end, p.cols, k0, w.col0, p.vec_weight);
      }
      load_tiles<T, BK, R, TH, Tile::kMembers>(s_shrink(s), kShrinkStride, Tile::kLdShrink, shrink,
                                               shrink_member_stride, p.rank, w.k_end, p.rank, k0, 0, w.slots,
                                               p.vec_shrink);
    }
  };

  const int k_tiles = ceil_div(w.k_end - w.k_begin, BK);
  __syncthreads();  // the previous user of this shared memory is done
#pragma unroll
  for (int s = 0; s < Tile::kStages - 1; ++s) {
    if (s < k_tiles) issue(s);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<Tile::kStages - 2>();
    __syncthreads();  // tile kt is visible to all; every warp is done with tile kt - 1
    if (kt + Tile::kStages - 1 < k_tiles) issue(kt + Tile::kStages - 1);  // refills tile kt - 1's stage
    cp_async_commit();
    const int s = kt % Tile::kStages;
    if (with_base) math.mma_base(base, s_in(s), kInStride, in_tiles, s_w(s));
    math.mma_items(low, s_in(s), kInStride, s_shrink(s), h, w);
  }
  cp_async_wait<0>();
  __syncthreads();
}

// One CTA per SM (256 threads, up to 255 registers): every fused kernel needs 166-255 registers
// (ptxas -v, CUDA 13.0, benchmarks/NOTES.md); held to 128 for two CTAs, the fp16 ones that used to
// fit spill 0.3-1.3 KB a thread. Not yet timed on a GPU.
template <class T, bool kForward, bool kShared, int kRankPad, int kBM>
__global__ void __launch_bounds__(256, 1) fused_lora_gemm_kernel(const FusedLoraGemmParams<T> p) {
  using Tile = FusedTile<T, kForward, kShared, kRankPad, kBM>;
  using Math = FusedMath<T, kForward, kShared, kRankPad, kBM>;
  constexpr int BM = kBM, BN = Tile::kBN, R = kRankPad, TH = Tile::kThreads;
  constexpr int kLowRows = Tile::kLowMembers * BM;  // rows of sLow / hi / lo: [member slot][BM]
  LORA_ENSEMBLE_DYNAMIC_SMEM(smem);
  const FusedHeader<Tile> h(smem);
  float* s_low = reinterpret_cast<float*>(smem + Tile::kLowOffset);
  T* s_hi = reinterpret_cast<T*>(smem + Tile::kHiOffset);
  T* s_lo = reinterpret_cast<T*>(smem + Tile::kLoOffset);
  T* s_expand = reinterpret_cast<T*>(smem + Tile::kExpandOffset);
  float* s_scratch = reinterpret_cast<float*>(smem + Tile::kScratchOffset);
  float* s_c = reinterpret_cast<float*>(smem + Tile::kCOffset);

  FusedTileWork w{};
  const int tile = static_cast<int>(blockIdx.x);
  w.tile_col = tile % p.col_tiles;
  w.col0 = w.tile_col * BN;
  w.row0 = (tile / p.col_tiles) * p.tile_rows;
  const int in_rows = kShared ? p.rows : p.members * p.rows;
  w.row_end = min_int(w.row0 + p.tile_rows, in_rows);
  w.rows_per_member = p.rows;
  const int split = static_cast<int>(blockIdx.z);
  w.k_begin = split * p.k_per_split;
  w.k_end = min_int(p.inner, w.k_begin + p.k_per_split);
  // The members of this CTA: stacked, those whose rows the tile holds (one pass); shared, its group's.
  int member_begin, member_end;
  if constexpr (kShared) {
    const int per_group = ceil_div(p.members, static_cast<int>(gridDim.y));
    member_begin = static_cast<int>(blockIdx.y) * per_group;
    member_end = min_int(member_begin + per_group, p.members);
  } else {
    member_begin = w.row0 / p.rows;
    member_end = (w.row_end - 1) / p.rows + 1;
  }
  const bool split_k = p.k_splits > 1;
  const int64_t tiles = static_cast<int64_t>(p.row_tiles) * p.col_tiles;
  // fp32 output rows of the base (stacked: the N * M rows; shared: the M rows) and this split's partials.
  const int64_t base_elems = static_cast<int64_t>(in_rows) * p.cols;
  const int64_t low_elems = static_cast<int64_t>(p.members) * p.rows * p.rank;
  auto partial_base = [&](int s) {
    return p.partial_base + (static_cast<int64_t>(blockIdx.y) * p.k_splits + s) * base_elems;
  };
  auto partial_low = [&](int s) {
    return p.partial_low + (static_cast<int64_t>(s) * p.col_tiles + w.tile_col) * low_elems;
  };
  // Index of (member slot j, tile row r) in low [N, M, r] rows: stacked, the stacked row; shared, member-major.
  auto low_row_of = [&](int j, int r) -> int64_t {
    return kShared ? static_cast<int64_t>(w.first_member + j) * p.rows + w.row0 + r : w.row0 + r;
  };

  const Math math;
  typename Math::Acc base;
  typename Math::LowAcc low;
  Math::zero(base);

  // Bounded, masked store of the fp32 tile in s_c (+ bias, + the given base output) to out (member n of
  // the shared-input forward; else the rows of `in` map to the rows of out).
  auto store_out = [&](int n) {
    const int64_t out_offset = kForward && kShared ? static_cast<int64_t>(n) * p.rows * p.cols : 0;
    for (int e = threadIdx.x; e < BM * BN; e += TH) {
      const int r = e / BN, c = e % BN;
      const int m = w.row0 + r, j = w.col0 + c;
      if (m < w.row_end && j < p.cols) {
        const int64_t at = static_cast<int64_t>(m) * p.cols + j;
        float v = s_c[r * Tile::kLdC + c];
        if (kForward && p.bias != nullptr) v += Num<T>::to_float(p.bias[j]);
        if (kForward && p.base != nullptr) v += Num<T>::to_float(p.base[at]);  // stacked [N*M, k] or shared [M, k]
        p.out[out_offset + at] = Num<T>::from_float(v);
      }
    }
  };

  // sLow [slot][BM][R] from the low-rank items (tensor cores: through their scratch tiles, keeping of
  // each item the rows of its member), zero for rows of no member and unused slots. Ends with a barrier.
  auto compose_low = [&]() {
    if constexpr (Num<T>::kTensorCore) {
      math.store_items(low, s_scratch, w);
      __syncthreads();
      for (int e = threadIdx.x; e < kLowRows * R; e += TH) {
        const int j = e / (BM * R), r = (e / R) % BM, q = e % R, tm = r / 16;
        int pair = -1;
        if constexpr (kShared) {
          if (j < w.slots && w.row0 + r < w.row_end) pair = tm * w.slots + j;
        } else {
          const int slot = w.slot_of(r);
          if (slot >= 0) pair = h.pair_of[tm * Tile::kMembers + slot];
        }
        const float v = pair >= 0 ? s_scratch[(pair * Tile::kRankTiles + q / 16) * 256 + (r % 16) * 16 + q % 16] : 0.0f;
        s_low[(j * BM + r) * Tile::kLdLow + q] = v;
      }
    } else {
      math.store_low(low, s_low, w);
    }
    __syncthreads();
  };

  // The epilogue of a pass, from a complete sLow: low to its output (column tile 0), s * low split for
  // the tensor cores, then each member's expand added to its rows (shared forward: to a copy of the base,
  // stored per member).
  auto epilogue = [&]() {
    bool beyond_fp16 = false;
    for (int e = threadIdx.x; e < kLowRows * R; e += TH) {
      const int j = e / (BM * R), r = (e / R) % BM, q = e % R;
      const float v = s_low[(j * BM + r) * Tile::kLdLow + q];
      if (w.tile_col == 0 && q < p.rank && j < (kShared ? w.slots : 1) && w.row0 + r < w.row_end) {
        p.low[low_row_of(j, r) * p.rank + q] = v;
      }
      // Columns past the rank are zeroed so that NaN/Inf in `in` cannot leak into them through the
      // shrink tile's padding.
      const float scaled = q < p.rank ? p.scaling * v : 0.0f;
      s_low[(j * BM + r) * Tile::kLdLow + q] = scaled;  // SIMT: the expand's operand; fp16: a rescale's source
      if constexpr (Num<T>::kTensorCore) {
        const int at = (j * BM + r) * Tile::kLdSplit + q;
        beyond_fp16 |= split_element(s_hi + at, s_lo + at, scaled);
      }
    }
    // The split's barrier; fp16 tiles with |s * low| beyond its range are split again divided by
    // 2^exponent, and the expand below runs on the accumulator divided by the same power of two.
    const int exponent =
        split_barrier<T, kLowRows, R, TH>(beyond_fp16, s_hi, s_lo, Tile::kLdSplit, s_low, Tile::kLdLow);
    const float down = ldexpf(1.0f, -exponent), up = ldexpf(1.0f, exponent);
    if (exponent != 0 && !(kForward && kShared)) Math::scale(base, down);
    constexpr int kExpandStride = Tile::kExpandTileBytes / Tile::kElem;
    const int64_t expand_member_stride = static_cast<int64_t>(p.rank) * p.cols;
    for (int c0 = 0; c0 < w.slots; c0 += Tile::kExpandChunk) {
      // (compile-time 1 where a chunk is one member: a loop ptxas knows runs once spares registers)
      const int count = Tile::kExpandChunk == 1 ? 1 : min_int(Tile::kExpandChunk, w.slots - c0);
      const T* expand = p.expand + (w.first_member + c0) * expand_member_stride;
      if constexpr (kForward) {  // B[n] [k, r]
        load_tiles<T, BN, R, TH, 0>(s_expand, kExpandStride, Tile::kLdExpand, expand,
                                                     expand_member_stride, p.rank, p.cols, p.rank, w.col0, 0, count,
                                                     p.vec_expand);
      } else {  // A[n] [r, d]
        load_tiles<T, R, BN, TH, 0>(s_expand, kExpandStride, Tile::kLdExpand, expand,
                                                     expand_member_stride, p.cols, p.rank, p.cols, 0, w.col0, count,
                                                     p.vec_expand);
      }
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      for (int i = 0; i < count; ++i) {
        const int slot = c0 + i;
        const T* s_expand_i = s_expand + i * kExpandStride;
        const int member_rows = kShared ? slot * BM : 0;  // shared input: this member's low rows
        if constexpr (kForward && kShared) {
          typename Math::Acc acc = base;
          if (exponent != 0) Math::scale(acc, down);
          if constexpr (Num<T>::kTensorCore) {
            math.expand_member(acc, s_hi + member_rows * Tile::kLdSplit, s_lo + member_rows * Tile::kLdSplit,
                               s_expand_i, slot, h);
          } else {
            math.expand_member(acc, s_low + member_rows * Tile::kLdLow, s_expand_i, slot, w);
          }
          if (exponent != 0) Math::scale(acc, up);
          if constexpr (!Tile::kOwnCRegion) __syncthreads();  // s_c overlays the expand tiles
          math.store(acc, s_c);
          __syncthreads();
          store_out(w.first_member + slot);
          __syncthreads();  // s_c is free again
        } else if constexpr (Num<T>::kTensorCore) {
          math.expand_member(base, s_hi + member_rows * Tile::kLdSplit, s_lo + member_rows * Tile::kLdSplit, s_expand_i,
                             slot, h);
        } else {
          math.expand_member(base, s_low + member_rows * Tile::kLdLow, s_expand_i, slot, w);
        }
      }
      __syncthreads();  // every warp is done with these expand tiles
    }
    if (exponent != 0 && !(kForward && kShared)) Math::scale(base, up);
  };

  // Passes over the CTA's members, kMembers at a time (stacked: one).
  for (int first = member_begin; first < member_end; first += Tile::kMembers) {
    w.first_member = first;
    w.slots = Tile::kMembers == 1 ? 1 : min_int(Tile::kMembers, member_end - first);
    w.pairs = build_header<Tile>(h, w);
    // The in W term: none without a weight; shared forward: x W0^T is the same for every member,
    // computed in the first pass; shared dx: every pass adds its members' dy[n] W0.
    const bool with_base = p.weight != nullptr && (!(kForward && kShared) || first == member_begin);
    Math::zero(low);
    fused_mainloop<T, kForward, kShared, kRankPad, kBM>(p, w, with_base, math, base, low, h, smem);
    compose_low();
    if (!split_k) {
      epilogue();
    } else {  // this split's in shrink, for the CTA of the tile that arrives last
      float* out_low = partial_low(split);
      for (int e = threadIdx.x; e < kLowRows * R; e += TH) {
        const int j = e / (BM * R), r = (e / R) % BM, q = e % R;
        if (q < p.rank && j < (kShared ? w.slots : 1) && w.row0 + r < w.row_end) {
          out_low[low_row_of(j, r) * p.rank + q] = s_low[(j * BM + r) * Tile::kLdLow + q];
        }
      }
    }
  }

  if (split_k) {
    // This split's in W0 partial sum, then the arrival count of the tile (the CUDA sample
    // threadFenceReduction's pattern): the last CTA adds up every split's partials in split order.
    __syncthreads();
    math.store(base, s_c);
    __syncthreads();
    float* out_base = partial_base(split);
    for (int e = threadIdx.x; e < BM * BN; e += TH) {
      const int r = e / BN, c = e % BN;
      if (w.row0 + r < w.row_end && w.col0 + c < p.cols) {
        out_base[static_cast<int64_t>(w.row0 + r) * p.cols + w.col0 + c] = s_c[r * Tile::kLdC + c];
      }
    }
    __threadfence();
    __syncthreads();  // s_c is read: its first word holds the arrival below
    int* s_last = reinterpret_cast<int*>(s_c);
    if (threadIdx.x == 0) {
      const int arrived = atomicAdd(p.arrivals + static_cast<int64_t>(blockIdx.y) * tiles + tile, 1);
      *s_last = arrived == p.k_splits - 1;
    }
    __syncthreads();
    const bool last = *s_last != 0;
    __syncthreads();  // every thread read it before s_c is written again
    if (!last) return;
    __threadfence();
    for (int e = threadIdx.x; e < BM * BN; e += TH) {
      const int r = e / BN, c = e % BN;
      float v = 0.0f;
      if (w.row0 + r < w.row_end && w.col0 + c < p.cols) {
        const int64_t at = static_cast<int64_t>(w.row0 + r) * p.cols + w.col0 + c;
        for (int s = 0; s < p.k_splits; ++s) v += load_cg(partial_base(s) + at);
      }
      s_c[r * Tile::kLdC + c] = v;
    }
    __syncthreads();
    math.load(base, s_c);
    for (int first = member_begin; first < member_end; first += Tile::kMembers) {
      w.first_member = first;
      w.slots = Tile::kMembers == 1 ? 1 : min_int(Tile::kMembers, member_end - first);
      w.pairs = build_header<Tile>(h, w);  // its barriers also order s_c's reads before s_low's writes
      for (int e = threadIdx.x; e < kLowRows * R; e += TH) {
        const int j = e / (BM * R), r = (e / R) % BM, q = e % R;
        float v = 0.0f;
        if (q < p.rank && j < (kShared ? w.slots : 1) && w.row0 + r < w.row_end) {
          const int64_t at = low_row_of(j, r) * p.rank + q;
          for (int s = 0; s < p.k_splits; ++s) v += load_cg(partial_low(s) + at);
        }
        s_low[(j * BM + r) * Tile::kLdLow + q] = v;
      }
      __syncthreads();
      epilogue();
    }
  }

  if constexpr (!(kForward && kShared)) {  // one output tile: stacked rows, or shared dx summed over members
    __syncthreads();
    math.store(base, s_c);
    __syncthreads();
    store_out(0);
  }
}

template <class T, bool kForward, bool kShared, int kRankPad, int kBM>
void launch_fused_lora_gemm_tile(const FusedLoraGemmParams<T>& p, cudaStream_t stream) {
  using Tile = FusedTile<T, kForward, kShared, kRankPad, kBM>;
  const int64_t tiles = static_cast<int64_t>(p.row_tiles) * p.col_tiles;
  TORCH_CHECK(tiles <= INT32_MAX, "lora_ensemble: ", p.row_tiles, " row tiles x ", p.col_tiles,
              " column tiles, over the grid limit");
  TORCH_CHECK(p.member_groups <= kMaxGridYZ && p.k_splits <= kMaxGridYZ, "lora_ensemble: ", p.member_groups,
              " member groups x ", p.k_splits, " splits, over the grid limit");
  TORCH_CHECK(p.tile_rows >= 1 && p.tile_rows <= kBM, "lora_ensemble: row tile of ", p.tile_rows, " rows for a ", kBM,
              "-row kernel");
  TORCH_CHECK(kShared || row_tile_members(p.rows, p.tile_rows, p.members) <= Tile::kMembers,
              "lora_ensemble: a ", p.tile_rows, "-row tile of ", p.rows, " rows per member holds more than ",
              Tile::kMembers, " members");
  TORCH_CHECK(p.k_splits == 1 || (p.partial_base != nullptr && p.partial_low != nullptr && p.arrivals != nullptr),
              "lora_ensemble: split-K without its workspace");
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(p.member_groups),
                  static_cast<unsigned>(p.k_splits));
  constexpr auto kernel = fused_lora_gemm_kernel<T, kForward, kShared, kRankPad, kBM>;
  once_per_device<kernel>(p.device, [] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile::kSmemBytes));
  });
  LORA_ENSEMBLE_LAUNCH(kernel, grid, Tile::kThreads, Tile::kSmemBytes, stream, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class T, bool kForward, bool kShared, int kBM>
void launch_fused_lora_gemm_rank(const FusedLoraGemmParams<T>& p, cudaStream_t stream) {
  switch (block_rank(p.rank)) {
    case 16: launch_fused_lora_gemm_tile<T, kForward, kShared, 16, kBM>(p, stream); break;
    case 32: launch_fused_lora_gemm_tile<T, kForward, kShared, 32, kBM>(p, stream); break;
    case 64: launch_fused_lora_gemm_tile<T, kForward, kShared, 64, kBM>(p, stream); break;
    default: launch_fused_lora_gemm_tile<T, kForward, kShared, 128, kBM>(p, stream); break;
  }
}

template <class T, bool kForward, bool kShared>
void launch_fused_lora_gemm_rows(const FusedLoraGemmParams<T>& p, cudaStream_t stream) {
  TORCH_CHECK(p.block_rows == kSmallBlockRows || p.block_rows == kLargeBlockRows, "lora_ensemble: row tile ",
              p.block_rows);
  if (p.block_rows == kSmallBlockRows) {
    launch_fused_lora_gemm_rank<T, kForward, kShared, kSmallBlockRows>(p, stream);
  } else {
    launch_fused_lora_gemm_rank<T, kForward, kShared, kLargeBlockRows>(p, stream);
  }
}

template <class T>
void launch_fused_lora_gemm(const FusedLoraGemmParams<T>& p, bool forward, cudaStream_t stream) {
  if (forward) {
    p.shared ? launch_fused_lora_gemm_rows<T, true, true>(p, stream)
             : launch_fused_lora_gemm_rows<T, true, false>(p, stream);
  } else {
    p.shared ? launch_fused_lora_gemm_rows<T, false, true>(p, stream)
             : launch_fused_lora_gemm_rows<T, false, false>(p, stream);
  }
}

}  // namespace lora_ensemble
