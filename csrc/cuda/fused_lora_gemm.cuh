// Fused GEMM + LoRA: the forward and the input gradient of a LoRA-Ensemble linear layer, one launch.
//
//   forward      out[n] = x[n] W0^T + b + s (x[n] A[n]^T) B[n]^T      low[n] = x[n] A[n]^T   (fp32)
//   backward dx  out[n] = dy[n] W0  +     s (dy[n] B[n]) A[n]          low[n] = dy[n] B[n]
// Without W0 (a base layer the kernel cannot read, e.g. a quantized one) the W0 term is left out,
// and the forward adds the given base output base[n] at the store instead.
//
// Generic form (csrc/cuda/params.cuh): out = in W + s (in shrink) expand, low = in shrink, with `inner`
// the reduction length.
// Tiling: a CTA (256 threads, 8 warps) owns a BM x BN = 64 x 128 output tile of one member
// (grid.x = row tile * column tiles + column tile, grid.y = member). Its K loop runs over `inner`
// in BK steps (32 for fp16/bf16, 16 for fp32) through a 3-stage cp.async pipeline of the tiles
// in [BM, BK], W [BK, BN] and shrink [BK, R] (R = r padded to 16, 32, 64 or 128), accumulating
// in W and low = in shrink (both fp32) from the same in tile. The epilogue writes low (CTAs of column
// tile 0 only), splits s low into 16-bit hi + lo parts (hi + lo carries ~16 mantissa bits, so the
// rank-r product keeps near-fp32 accuracy on tensor cores; see common.cuh for fp16's range), loads
// expand [R, BN] and adds (hi + lo) expand to the accumulator, then stores through shared memory with the bias, masked at the
// edges. fp16/bf16 use WMMA 16x16x16 tensor-core tiles (warp tile 32 x 32); fp32 uses SIMT FMAs
// (thread tile 4 x 8), exact fp32 (no tf32).
//
// Shared input (a template flag, so the stacked kernels carry no second accumulator): the CTA loops
// over members. Forward: grid.y = member groups (p.member_groups, more than 1 when the output tiles
// alone leave SMs idle, as at batch 1); each CTA computes x W0^T once (with its group's first
// member) and, per member, re-runs the K loop for x A[n]^T only. Backward dx: every member's
// dy[n] W0 + s dyb[n] A[n] accumulated into one accumulator (dx is summed over members); with more
// than one group (few tiles), each group's partial sum is atomically added into the fp32 out_sum.
#pragma once

#include <c10/cuda/CUDAException.h>

#include <type_traits>

#include "common.cuh"
#include "params.cuh"

namespace lora_ensemble {

template <class T, bool kForward, int kRankPad>
struct FusedTile {
  static constexpr int kBM = 64, kBN = 128, kThreads = 256, kStages = 3;
  static constexpr int kBK = sizeof(T) == 2 ? 32 : 16;
  static constexpr int kPad = 16 / sizeof(T);  // keeps rows 16-byte aligned and staggers banks
  // Pipeline stage, element strides. forward: sW [BN][BK], sShrink [R][BK]; backward dx: sW [BK][BN],
  // sShrink [BK][R].
  static constexpr int kLdIn = kBK + kPad;
  static constexpr int kLdW = kForward ? kBK + kPad : kBN + kPad;
  static constexpr int kLdShrink = kForward ? kBK + kPad : kRankPad + kPad;
  static constexpr int kInBytes = round_up(kBM * kLdIn * (int)sizeof(T), 128);
  static constexpr int kWBytes = round_up((kForward ? kBN : kBK) * kLdW * (int)sizeof(T), 128);
  static constexpr int kShrinkBytes = round_up((kForward ? kRankPad : kBK) * kLdShrink * (int)sizeof(T), 128);
  static constexpr int kStageBytes = kInBytes + kWBytes + kShrinkBytes;
  // Epilogue: sLow fp32 [BM][R]; 16-bit sHi, sLo [BM][R]; forward sExpand [BN][R], backward dx [R][BN].
  static constexpr int kLdLow = kRankPad + 4;
  static constexpr int kLdSplit = kRankPad + kPad;
  static constexpr int kLdExpand = kForward ? kRankPad + kPad : kBN + kPad;
  static constexpr int kLowBytes = round_up(kBM * kLdLow * 4, 128);
  static constexpr int kSplitBytes = Num<T>::kTensorCore ? round_up(kBM * kLdSplit * (int)sizeof(T), 128) : 0;
  static constexpr int kExpandBytes = round_up((kForward ? kBN : kRankPad) * kLdExpand * (int)sizeof(T), 128);
  static constexpr int kPipeBytes = kStages * kStageBytes;
  // Layout [sLow | sHi | sLo | sExpand], sExpand loaded while sLow is split. For fp16/bf16 at rank
  // 128 that would outgrow the pipeline (101 KB, over the 99 KB a CTA gets on sm_86/sm_89), so there
  // sExpand overlays sLow instead, [sHi | sLo | sLow or sExpand], and is loaded after the split.
  static constexpr bool kExpandOverLow = Num<T>::kTensorCore && kLowBytes + 2 * kSplitBytes + kExpandBytes > kPipeBytes;
  static constexpr int kLowOffset = kExpandOverLow ? 2 * kSplitBytes : 0;
  static constexpr int kHiOffset = kExpandOverLow ? 0 : kLowBytes;
  static constexpr int kLoOffset = kHiOffset + kSplitBytes;
  static constexpr int kExpandOffset = kExpandOverLow ? kLowOffset : kLowBytes + 2 * kSplitBytes;
  static constexpr int kEpilogueBytes = kExpandOffset + (kExpandOverLow && kLowBytes > kExpandBytes ? kLowBytes : kExpandBytes);
  // Output staging, fp32 [BM][BN], overlays everything above once the expand is done.
  static constexpr int kLdC = kBN + 4;
  static constexpr int kCBytes = kBM * kLdC * 4;
  static constexpr int kSmemBytes = max3(kPipeBytes, kEpilogueBytes, kCBytes);
  static_assert(kRankPad % 16 == 0 && kRankPad <= kMaxRank, "rank tile must be 16..128, a multiple of 16");
};

// Tensor-core math (fp16/bf16): warp w owns output rows 32 (w / 4) .. +32, columns 32 (w % 4) .. +32
// (2 x 2 WMMA tiles), plus the low-rank tiles f = w, w + 8, ... of the BM/16 x R/16 grid of low.
template <class T, bool kForward, int kRankPad>
struct WmmaMath {
  using Tile = FusedTile<T, kForward, kRankPad>;
  // forward: W, shrink and expand are stored [n][k] (col-major B operands); backward dx: [k][n].
  using LayoutB = std::conditional_t<kForward, wmma::col_major, wmma::row_major>;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  static constexpr int kLowTiles = (Tile::kBM / 16) * (kRankPad / 16);
  static constexpr int kLowTilesPerWarp = ceil_div(kLowTiles, Tile::kThreads / 32);

  struct Acc {
    FragC f[2][2];
  };
  struct LowAcc {
    FragC f[kLowTilesPerWarp];
  };

  int warp, warp_m, warp_n;

  __device__ WmmaMath() : warp(threadIdx.x / 32), warp_m(warp / 4), warp_n(warp % 4) {}

  __device__ static void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc.f[i][j], 0.0f);
  }
  __device__ static void zero(LowAcc& acc) {
#pragma unroll
    for (int t = 0; t < kLowTilesPerWarp; ++t) wmma::fill_fragment(acc.f[t], 0.0f);
  }

  // B-operand tile at (k offset kk, n offset nn) of a tile stored with leading dimension ld.
  __device__ static const T* b_tile(const T* s, int ld, int kk, int nn) {
    return kForward ? s + nn * ld + kk : s + kk * ld + nn;
  }

  // acc += sIn sW (when with_base) and low += sIn sShrink over one BK slice.
  __device__ void mma_stage(Acc& acc, LowAcc& low, const T* s_in, const T* s_w, const T* s_shrink, bool with_base) const {
#pragma unroll
    for (int kk = 0; kk < Tile::kBK; kk += 16) {
      if (with_base) {
        FragA a[2];
        FragB b[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          wmma::load_matrix_sync(a[i], s_in + (warp_m * 32 + i * 16) * Tile::kLdIn + kk, Tile::kLdIn);
        }
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          wmma::load_matrix_sync(b[j], b_tile(s_w, Tile::kLdW, kk, warp_n * 32 + j * 16), Tile::kLdW);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc.f[i][j], a[i], b[j], acc.f[i][j]);
      }
#pragma unroll
      for (int t = 0; t < kLowTilesPerWarp; ++t) {
        const int tile = warp + t * (Tile::kThreads / 32);
        if (kLowTiles % (Tile::kThreads / 32) == 0 || tile < kLowTiles) {
          const int tm = tile / (kRankPad / 16), tq = tile % (kRankPad / 16);
          FragA a;
          FragB p;
          wmma::load_matrix_sync(a, s_in + tm * 16 * Tile::kLdIn + kk, Tile::kLdIn);
          wmma::load_matrix_sync(p, b_tile(s_shrink, Tile::kLdShrink, kk, tq * 16), Tile::kLdShrink);
          wmma::mma_sync(low.f[t], a, p, low.f[t]);
        }
      }
    }
  }

  __device__ void store_low(const LowAcc& low, float* s_low) const {
#pragma unroll
    for (int t = 0; t < kLowTilesPerWarp; ++t) {
      const int tile = warp + t * (Tile::kThreads / 32);
      if (kLowTiles % (Tile::kThreads / 32) == 0 || tile < kLowTiles) {
        const int tm = tile / (kRankPad / 16), tq = tile % (kRankPad / 16);
        wmma::store_matrix_sync(s_low + tm * 16 * Tile::kLdLow + tq * 16, low.f[t], Tile::kLdLow, wmma::mem_row_major);
      }
    }
  }

  // acc += (sHi + sLo) sExpand, the scaled low-rank product split into two 16-bit parts.
  __device__ void expand(Acc& acc, const T* s_hi, const T* s_lo, const T* s_expand) const {
#pragma unroll
    for (int kk = 0; kk < kRankPad; kk += 16) {
      FragA hi[2], lo[2];
      FragB q[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int row = warp_m * 32 + i * 16;
        wmma::load_matrix_sync(hi[i], s_hi + row * Tile::kLdSplit + kk, Tile::kLdSplit);
        wmma::load_matrix_sync(lo[i], s_lo + row * Tile::kLdSplit + kk, Tile::kLdSplit);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::load_matrix_sync(q[j], b_tile(s_expand, Tile::kLdExpand, kk, warp_n * 32 + j * 16), Tile::kLdExpand);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          wmma::mma_sync(acc.f[i][j], hi[i], q[j], acc.f[i][j]);
          wmma::mma_sync(acc.f[i][j], lo[i], q[j], acc.f[i][j]);
        }
    }
  }

  // acc *= factor (a power of two: exact).
  __device__ static void scale(Acc& acc, float factor) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int t = 0; t < acc.f[i][j].num_elements; ++t) acc.f[i][j].x[t] *= factor;
  }

  __device__ void store(const Acc& acc, float* s_c) const {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(s_c + (warp_m * 32 + i * 16) * Tile::kLdC + warp_n * 32 + j * 16, acc.f[i][j],
                                Tile::kLdC, wmma::mem_row_major);
  }
};

// SIMT math (fp32): thread t owns output rows 4 (t / 16) .. +4 and columns t % 16 + 16 j (j < 8),
// and the low-rank entries of row t / 4, columns t % 4 + 4 c (c < R / 4).
template <bool kForward, int kRankPad>
struct SimtMath {
  using Tile = FusedTile<float, kForward, kRankPad>;
  static constexpr int kRowsPerThread = 4, kColsPerThread = 8, kLowPerThread = kRankPad / 4;
  static_assert(Tile::kBM == 16 * kRowsPerThread && Tile::kBN == 16 * kColsPerThread && Tile::kThreads == 256,
                "thread layout assumes a 64 x 128 tile and 256 threads");

  struct Acc {
    float v[kRowsPerThread][kColsPerThread];
  };
  struct LowAcc {
    float v[kLowPerThread];
  };

  int row, col, low_row, low_col;

  __device__ SimtMath()
      : row((threadIdx.x / 16) * kRowsPerThread),
        col(threadIdx.x % 16),
        low_row(threadIdx.x / 4),
        low_col(threadIdx.x % 4) {}

  __device__ static void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) acc.v[i][j] = 0.0f;
  }
  __device__ static void zero(LowAcc& acc) {
#pragma unroll
    for (int c = 0; c < kLowPerThread; ++c) acc.v[c] = 0.0f;
  }

  // Element (k index kk, n index nn) of a B-side tile (W, shrink or expand) with leading dimension ld.
  __device__ static float b_at(const float* s, int ld, int kk, int nn) {
    return kForward ? s[nn * ld + kk] : s[kk * ld + nn];
  }

  __device__ void mma_stage(Acc& acc, LowAcc& low, const float* s_in, const float* s_w, const float* s_shrink,
                            bool with_base) const {
#pragma unroll 4
    for (int kk = 0; kk < Tile::kBK; ++kk) {
      if (with_base) {
        float a[kRowsPerThread], b[kColsPerThread];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) a[i] = s_in[(row + i) * Tile::kLdIn + kk];
#pragma unroll
        for (int j = 0; j < kColsPerThread; ++j) b[j] = b_at(s_w, Tile::kLdW, kk, col + 16 * j);
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
          for (int j = 0; j < kColsPerThread; ++j) acc.v[i][j] = fmaf(a[i], b[j], acc.v[i][j]);
      }
      const float a = s_in[low_row * Tile::kLdIn + kk];
#pragma unroll
      for (int c = 0; c < kLowPerThread; ++c) low.v[c] = fmaf(a, b_at(s_shrink, Tile::kLdShrink, kk, low_col + 4 * c), low.v[c]);
    }
  }

  __device__ void store_low(const LowAcc& low, float* s_low) const {
#pragma unroll
    for (int c = 0; c < kLowPerThread; ++c) s_low[low_row * Tile::kLdLow + low_col + 4 * c] = low.v[c];
  }

  // acc += sLow sExpand, where sLow holds s * low.
  __device__ void expand(Acc& acc, const float* s_low, const float* s_expand) const {
#pragma unroll 4
    for (int kk = 0; kk < kRankPad; ++kk) {
      float a[kRowsPerThread], b[kColsPerThread];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) a[i] = s_low[(row + i) * Tile::kLdLow + kk];
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) b[j] = b_at(s_expand, Tile::kLdExpand, kk, col + 16 * j);
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
        for (int j = 0; j < kColsPerThread; ++j) acc.v[i][j] = fmaf(a[i], b[j], acc.v[i][j]);
    }
  }

  __device__ void store(const Acc& acc, float* s_c) const {
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) s_c[(row + i) * Tile::kLdC + col + 16 * j] = acc.v[i][j];
  }
};

template <class T, bool kForward, int kRankPad>
using FusedMath =
    std::conditional_t<Num<T>::kTensorCore, WmmaMath<T, kForward, kRankPad>, SimtMath<kForward, kRankPad>>;

// The K loop of member n: acc += in[n] W (when with_base) and low += in[n] shrink[n] over the whole
// reduction, through the multi-stage cp.async pipeline. Starts and ends with a CTA barrier.
template <class T, bool kForward, bool kShared, int kRankPad>
__device__ void fused_mainloop(const FusedLoraGemmParams<T>& p, int n, int row0, int col0, bool with_base,
                               const FusedMath<T, kForward, kRankPad>& math,
                               typename FusedMath<T, kForward, kRankPad>::Acc& acc,
                               typename FusedMath<T, kForward, kRankPad>::LowAcc& low, unsigned char* smem) {
  using Tile = FusedTile<T, kForward, kRankPad>;
  constexpr int BM = Tile::kBM, BN = Tile::kBN, BK = Tile::kBK, R = kRankPad, TH = Tile::kThreads;
  const T* in = p.in + (kForward && kShared ? 0 : static_cast<int64_t>(n) * p.rows * p.inner);
  const T* shrink = p.shrink + static_cast<int64_t>(n) * p.rank * p.inner;
  auto s_in = [&](int s) { return reinterpret_cast<T*>(smem + s * Tile::kStageBytes); };
  auto s_w = [&](int s) { return reinterpret_cast<T*>(smem + s * Tile::kStageBytes + Tile::kInBytes); };
  auto s_shrink = [&](int s) { return reinterpret_cast<T*>(smem + s * Tile::kStageBytes + Tile::kInBytes + Tile::kWBytes); };

  auto issue = [&](int kt) {
    const int s = kt % Tile::kStages, k0 = kt * BK;
    load_tile<T, BM, BK, TH>(s_in(s), Tile::kLdIn, in, p.inner, p.rows, p.inner, row0, k0, p.vec_in);
    if constexpr (kForward) {
      // W0 [k, d] rows are output columns; A[n] [r, d] rows are rank columns.
      if (with_base) {
        load_tile<T, BN, BK, TH>(s_w(s), Tile::kLdW, p.weight, p.inner, p.cols, p.inner, col0, k0, p.vec_weight);
      }
      load_tile<T, R, BK, TH>(s_shrink(s), Tile::kLdShrink, shrink, p.inner, p.rank, p.inner, 0, k0, p.vec_shrink);
    } else {
      // W0 [k, d] rows are the reduction; B[n] [k, r] rows are the reduction.
      if (with_base) {
        load_tile<T, BK, BN, TH>(s_w(s), Tile::kLdW, p.weight, p.cols, p.inner, p.cols, k0, col0, p.vec_weight);
      }
      load_tile<T, BK, R, TH>(s_shrink(s), Tile::kLdShrink, shrink, p.rank, p.inner, p.rank, k0, 0, p.vec_shrink);
    }
  };

  const int k_tiles = ceil_div(p.inner, BK);
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
    math.mma_stage(acc, low, s_in(s), s_w(s), s_shrink(s), with_base);
  }
  cp_async_wait<0>();
  __syncthreads();
}

// Two CTAs per SM where the kernel then fits 128 registers without spilling on sm_80 and sm_90 (ptxas
// -v, CUDA 13.0): fp16 up to rank 32, except the shared-input forward, which keeps its base tile
// across members (28-64 B/thread of spills on sm_80). bf16 needs 160-190 registers at those ranks and
// spills 40-176 B/thread at 128 (only the stacked forward at rank 32 on sm_90 fits), fp32 and larger
// ranks more: one CTA. Not yet timed on a GPU.
template <class T, bool kForward, bool kShared, int kRankPad>
constexpr int kFusedMinBlocksPerSM = std::is_same_v<T, __half> && kRankPad <= 32 && !(kForward && kShared) ? 2 : 1;

template <class T, bool kForward, bool kShared, int kRankPad>
__global__ void __launch_bounds__(256, (kFusedMinBlocksPerSM<T, kForward, kShared, kRankPad>))
    fused_lora_gemm_kernel(const FusedLoraGemmParams<T> p) {
  using Tile = FusedTile<T, kForward, kRankPad>;
  using Math = FusedMath<T, kForward, kRankPad>;
  constexpr int BM = Tile::kBM, BN = Tile::kBN, R = kRankPad, TH = Tile::kThreads;
  extern __shared__ __align__(128) unsigned char smem[];
  float* s_low = reinterpret_cast<float*>(smem + Tile::kLowOffset);
  T* s_hi = reinterpret_cast<T*>(smem + Tile::kHiOffset);
  T* s_lo = reinterpret_cast<T*>(smem + Tile::kLoOffset);
  T* s_expand = reinterpret_cast<T*>(smem + Tile::kExpandOffset);
  float* s_c = reinterpret_cast<float*>(smem);

  const int col_tiles = ceil_div(p.cols, BN);
  const int tile_col = static_cast<int>(blockIdx.x) % col_tiles;
  const int row0 = (static_cast<int>(blockIdx.x) / col_tiles) * BM;
  const int col0 = tile_col * BN;
  // Stacked: one member per grid.y; shared: grid.y groups of members.
  const int per_group = ceil_div(p.members, static_cast<int>(gridDim.y));
  const int first = kShared ? static_cast<int>(blockIdx.y) * per_group : static_cast<int>(blockIdx.y);
  const int last = kShared ? min_int(first + per_group, p.members) : first + 1;

  const Math math;
  typename Math::Acc base;
  typename Math::LowAcc low;
  Math::zero(base);

  // Bounded, masked store of the fp32 tile in s_c (+ bias, + the given base output of member n) to
  // out[row0.., col0..], or atomically added to the fp32 sum[row0.., col0..] when that is given.
  auto store_out = [&](T* out, float* sum, int n) {
    const T* base_out = kForward && p.base != nullptr
                            ? p.base + (kShared ? 0 : static_cast<int64_t>(n) * p.rows * p.cols)
                            : nullptr;
    for (int e = threadIdx.x; e < BM * BN; e += TH) {
      const int r = e / BN, c = e % BN;
      const int m = row0 + r, j = col0 + c;
      if (m < p.rows && j < p.cols) {
        const int64_t at = static_cast<int64_t>(m) * p.cols + j;
        float v = s_c[r * Tile::kLdC + c];
        if (kForward && p.bias != nullptr) v += Num<T>::to_float(p.bias[j]);
        if (base_out != nullptr) v += Num<T>::to_float(base_out[at]);
        if (sum != nullptr) {
          atomicAdd(sum + at, v);
        } else {
          out[at] = Num<T>::from_float(v);
        }
      }
    }
  };

  for (int n = first; n < last; ++n) {
    // The in W term: none without a weight (the low-rank update over a given base output); forward +
    // shared: x W0^T is the same for every member, computed with the first.
    const bool with_base = p.weight != nullptr && (!kForward || n == first);
    Math::zero(low);
    fused_mainloop<T, kForward, kShared, kRankPad>(p, n, row0, col0, with_base, math, base, low, smem);

    // Epilogue 1: low to shared memory; start loading this member's expand tile.
    const T* expand = p.expand + static_cast<int64_t>(n) * p.rank * p.cols;
    auto load_expand = [&] {
      if constexpr (kForward) {
        load_tile<T, BN, R, TH>(s_expand, Tile::kLdExpand, expand, p.rank, p.cols, p.rank, col0, 0, p.vec_expand);  // B[n] [k, r]
      } else {
        load_tile<T, R, BN, TH>(s_expand, Tile::kLdExpand, expand, p.cols, p.rank, p.cols, 0, col0, p.vec_expand);  // A[n] [r, d]
      }
      cp_async_commit();
    };
    math.store_low(low, s_low);
    if constexpr (!Tile::kExpandOverLow) load_expand();
    __syncthreads();

    // Epilogue 2: write `low` (once per row tile), and prepare s * low for the expand in s_low (and
    // split into 16-bit hi + lo parts for the tensor cores, common.cuh); columns past the rank are
    // zeroed so that NaN/Inf in `in` cannot leak into them through the shrink tile's padding.
    float* low_out = p.low + static_cast<int64_t>(n) * p.rows * p.rank;
    bool beyond_fp16 = false;
    for (int e = threadIdx.x; e < BM * R; e += TH) {
      const int r = e / R, q = e % R;
      const int m = row0 + r;
      const float v = s_low[r * Tile::kLdLow + q];
      if (tile_col == 0 && q < p.rank && m < p.rows) low_out[static_cast<int64_t>(m) * p.rank + q] = v;
      const float scaled = q < p.rank ? p.scaling * v : 0.0f;
      s_low[r * Tile::kLdLow + q] = scaled;
      if constexpr (Num<T>::kTensorCore) {
        beyond_fp16 |= split_element(s_hi + r * Tile::kLdSplit + q, s_lo + r * Tile::kLdSplit + q, scaled);
      }
    }
    // The split's barrier; fp16 tiles with |s * low| beyond its range are split again divided by
    // 2^exponent, and the expand below runs on the accumulator divided by the same power of two.
    int exponent;
    if constexpr (Tile::kExpandOverLow) {
      exponent = split_barrier<T, BM, R, TH>(beyond_fp16, s_hi, s_lo, Tile::kLdSplit, s_low, Tile::kLdLow);
      load_expand();  // every thread is done reading s_low
      cp_async_wait<0>();
      __syncthreads();
    } else {
      cp_async_wait<0>();
      exponent = split_barrier<T, BM, R, TH>(beyond_fp16, s_hi, s_lo, Tile::kLdSplit, s_low, Tile::kLdLow);
    }

    // Epilogue 3: add the low-rank product; store (forward: per member; backward dx: stacked
    // per member, shared summed over all members at the end).
    auto add_expand = [&](typename Math::Acc& acc) {
      if constexpr (Num<T>::kTensorCore) {
        if (exponent != 0) Math::scale(acc, ldexpf(1.0f, -exponent));
        math.expand(acc, s_hi, s_lo, s_expand);
        if (exponent != 0) Math::scale(acc, ldexpf(1.0f, exponent));
      } else {
        math.expand(acc, s_low, s_expand);
      }
    };
    if constexpr (kForward && kShared) {  // keep x W0^T for the next member
      typename Math::Acc acc = base;
      add_expand(acc);
      __syncthreads();  // s_c overlays s_low / s_expand
      math.store(acc, s_c);
      __syncthreads();
      store_out(p.out + static_cast<int64_t>(n) * p.rows * p.cols, nullptr, n);
    } else {
      add_expand(base);
      if constexpr (!kShared) {
        __syncthreads();
        math.store(base, s_c);
        __syncthreads();
        store_out(p.out + static_cast<int64_t>(n) * p.rows * p.cols, nullptr, n);
      }
    }
  }
  if constexpr (!kForward && kShared) {
    __syncthreads();
    math.store(base, s_c);
    __syncthreads();
    store_out(p.out, p.out_sum, 0);  // out_sum: this group's partial sum over its members
  }
}

template <class T, bool kForward, bool kShared, int kRankPad>
void launch_fused_lora_gemm_tile(const FusedLoraGemmParams<T>& p, cudaStream_t stream) {
  using Tile = FusedTile<T, kForward, kRankPad>;
  const int64_t tiles = static_cast<int64_t>(ceil_div(p.rows, Tile::kBM)) * ceil_div(p.cols, Tile::kBN);
  TORCH_CHECK(tiles <= INT32_MAX, "lora_ensemble: ", p.rows, " rows x ", p.cols, " columns need ", tiles,
              " tiles, over the grid limit");
  const int groups = kShared ? p.member_groups : p.members;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(groups));
  constexpr auto kernel = fused_lora_gemm_kernel<T, kForward, kShared, kRankPad>;
  once_per_device<kernel>(p.device, [] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile::kSmemBytes));
  });
  kernel<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class T, bool kForward, bool kShared>
void launch_fused_lora_gemm_rank(const FusedLoraGemmParams<T>& p, cudaStream_t stream) {
  if (p.rank <= 16) {
    launch_fused_lora_gemm_tile<T, kForward, kShared, 16>(p, stream);
  } else if (p.rank <= 32) {
    launch_fused_lora_gemm_tile<T, kForward, kShared, 32>(p, stream);
  } else if (p.rank <= 64) {
    launch_fused_lora_gemm_tile<T, kForward, kShared, 64>(p, stream);
  } else {
    launch_fused_lora_gemm_tile<T, kForward, kShared, 128>(p, stream);
  }
}

template <class T>
void launch_fused_lora_gemm(const FusedLoraGemmParams<T>& p, bool forward, cudaStream_t stream) {
  if (forward) {
    p.shared ? launch_fused_lora_gemm_rank<T, true, true>(p, stream)
             : launch_fused_lora_gemm_rank<T, true, false>(p, stream);
  } else {
    p.shared ? launch_fused_lora_gemm_rank<T, false, true>(p, stream)
             : launch_fused_lora_gemm_rank<T, false, false>(p, stream);
  }
}

}  // namespace lora_ensemble
