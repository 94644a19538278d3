// Grouped LoRA weight gradients: every member's dA and dB in one launch.
//
//   dA[n] = s dyb[n]^T x[n]   [r, d]          dB[n] = s dy[n]^T xa[n]   [k, r]
//
// Both are grad[j, q] = s sum_m in[m, j] low[m, q] (csrc/cuda/params.cuh), with in = x (j < d) or
// dy (j < k) in the input dtype and low = dyb or xa in fp32 (the backward-dx / forward by-products);
// dA is stored transposed. Tiling: a CTA (256 threads, 8 warps) owns BJ = 128 rows j of one output of
// one member and all R columns (r padded to 16, 32, 64 or 128): grid.x = the ceil(d / BJ) tiles of
// dA followed by the ceil(k / BJ) tiles of dB, grid.y = member, grid.z = row range (launch_policy.cuh:
// grad_row_splits). The K loop runs
// over the CTA's rows in BKM = 32 steps through a 3-stage cp.async pipeline of in [BKM, BJ] and
// low [BKM, R]. fp16/bf16: low is split into 16-bit hi + lo parts in shared memory (common.cuh) and
// warp w accumulates rows 16 w .. +16 with WMMA (fp32 accumulate); fp32: SIMT FMAs, thread tile
// 4 x R/8. s and the cast happen at the store. With one row range (the default, and always under
// torch.use_deterministic_algorithms) each output element is written once; with several (long
// inputs whose (tile, member) CTAs alone leave SMs idle) each CTA adds its partial sum to an fp32
// output with atomics, which the host then casts.
#pragma once

#ifndef LORA_ENSEMBLE_HOST_EMULATION
#include <c10/cuda/CUDAException.h>
#endif

#include <type_traits>

#include "common.cuh"
#include "launch_policy.cuh"
#include "params.cuh"

namespace lora_ensemble {

template <class T, int kRankPad>
struct LoraGradTile {
  static constexpr int kBJ = kGradBlockCols, kBKM = 32, kThreads = 256, kStages = 3;
  static_assert(kGradRowQuantum % kBKM == 0, "a row range of the split is whole K steps");
  static constexpr int kLdIn = kBJ + 16 / (int)sizeof(T);
  static constexpr int kLdLow = kRankPad + 4;  // fp32
  static constexpr int kLdSplit = kRankPad + 16 / (int)sizeof(T);
  static constexpr int kInBytes = round_up(kBKM * kLdIn * (int)sizeof(T), 128);
  static constexpr int kLowBytes = round_up(kBKM * kLdLow * 4, 128);
  static constexpr int kStageBytes = kInBytes + kLowBytes;
  static constexpr int kSplitBytes = Num<T>::kTensorCore ? round_up(kBKM * kLdSplit * (int)sizeof(T), 128) : 0;
  static constexpr int kLdC = kRankPad + 4;
  static constexpr int kCBytes = kBJ * kLdC * 4;
  static constexpr int kPipeBytes = kStages * kStageBytes + 2 * kSplitBytes;
  static constexpr int kSmemBytes = kPipeBytes > kCBytes ? kPipeBytes : kCBytes;  // s_c overlays the pipeline
  static_assert(kRankPad % 16 == 0 && kRankPad <= kMaxRank, "rank tile must be 16..128, a multiple of 16");
};

// Tensor cores: warp w owns grad rows 16 w .. +16 and every R / 16 column tile.
template <class T, int kRankPad>
struct LoraGradWmma {
  using Tile = LoraGradTile<T, kRankPad>;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major>;  // in^T: in is [m][j]
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;  // low: [m][q]
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  static constexpr int kTiles = kRankPad / 16;
  static_assert(Tile::kBJ == 16 * (Tile::kThreads / 32), "one 16-row strip per warp");
  struct Acc {
    FragC f[kTiles];
  };
  int warp;
  __device__ LoraGradWmma() : warp(threadIdx.x / 32) {}
  __device__ static void zero(Acc& acc) {
#pragma unroll
    for (int t = 0; t < kTiles; ++t) wmma::fill_fragment(acc.f[t], 0.0f);
  }
  __device__ void mma_stage(Acc& acc, const T* s_in, const T* s_hi, const T* s_lo) const {
#pragma unroll
    for (int kk = 0; kk < Tile::kBKM; kk += 16) {
      FragA a;
      wmma::load_matrix_sync(a, s_in + kk * Tile::kLdIn + warp * 16, Tile::kLdIn);
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        FragB hi, lo;
        wmma::load_matrix_sync(hi, s_hi + kk * Tile::kLdSplit + t * 16, Tile::kLdSplit);
        wmma::load_matrix_sync(lo, s_lo + kk * Tile::kLdSplit + t * 16, Tile::kLdSplit);
        wmma::mma_sync(acc.f[t], a, hi, acc.f[t]);
        wmma::mma_sync(acc.f[t], a, lo, acc.f[t]);
      }
    }
  }
  // acc *= factor (a power of two: exact).
  __device__ static void scale(Acc& acc, float factor) {
#pragma unroll
    for (int t = 0; t < kTiles; ++t)
#pragma unroll
      for (int i = 0; i < acc.f[t].num_elements; ++i) acc.f[t].x[i] *= factor;
  }
  __device__ void store(const Acc& acc, float* s_c) const {
#pragma unroll
    for (int t = 0; t < kTiles; ++t)
      wmma::store_matrix_sync(s_c + warp * 16 * Tile::kLdC + t * 16, acc.f[t], Tile::kLdC, wmma::mem_row_major);
  }
};

// SIMT (fp32): thread t owns grad rows t % 32 + 32 i (i < 4) and columns t / 32 + 8 c (c < R / 8).
template <int kRankPad>
struct LoraGradSimt {
  using Tile = LoraGradTile<float, kRankPad>;
  static constexpr int kRowsPerThread = 4, kColsPerThread = kRankPad / 8;
  static_assert(Tile::kBJ == 32 * kRowsPerThread && Tile::kThreads == 256,
                "thread layout assumes BJ = 128, 256 threads");
  struct Acc {
    float v[kRowsPerThread][kColsPerThread];
  };
  int row, col;
  __device__ LoraGradSimt() : row(threadIdx.x % 32), col(threadIdx.x / 32) {}
  __device__ static void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) acc.v[i][c] = 0.0f;
  }
  __device__ void mma_stage(Acc& acc, const float* s_in, const float* s_low) const {
#pragma unroll 4
    for (int kk = 0; kk < Tile::kBKM; ++kk) {
      float u[kRowsPerThread], v[kColsPerThread];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) u[i] = s_in[kk * Tile::kLdIn + row + 32 * i];
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) v[c] = s_low[kk * Tile::kLdLow + col + 8 * c];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
        for (int c = 0; c < kColsPerThread; ++c) acc.v[i][c] = fmaf(u[i], v[c], acc.v[i][c]);
    }
  }
  __device__ void store(const Acc& acc, float* s_c) const {
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) s_c[(row + 32 * i) * Tile::kLdC + col + 8 * c] = acc.v[i][c];
  }
};

template <class T, int kRankPad>
__global__ void __launch_bounds__(256) lora_grads_kernel(const LoraGradParams<T> p) {
  using Tile = LoraGradTile<T, kRankPad>;
  using Math = std::conditional_t<Num<T>::kTensorCore, LoraGradWmma<T, kRankPad>, LoraGradSimt<kRankPad>>;
  constexpr int BJ = Tile::kBJ, BKM = Tile::kBKM, R = kRankPad, TH = Tile::kThreads;
  LORA_ENSEMBLE_DYNAMIC_SMEM(smem);

  const int n = blockIdx.y;
  const int a_tiles = ceil_div(p.d, BJ);
  const bool is_a = static_cast<int>(blockIdx.x) < a_tiles;
  const int j0 = (is_a ? static_cast<int>(blockIdx.x) : static_cast<int>(blockIdx.x) - a_tiles) * BJ;
  const int width = is_a ? p.d : p.k;  // rows of grad: d for dA^T, k for dB
  const T* in = is_a ? p.x + (p.shared ? 0 : static_cast<int64_t>(n) * p.rows * p.d)
                     : p.dy + static_cast<int64_t>(n) * p.rows * p.k;
  const float* low = (is_a ? p.dyb : p.xa) + static_cast<int64_t>(n) * p.rows * p.rank;
  const bool vec_in = is_a ? p.vec_x : p.vec_dy;
  const int row_begin = static_cast<int>(blockIdx.z) * p.rows_per_split;
  const int row_end = min_int(row_begin + p.rows_per_split, p.rows);  // rows past it are masked like the edge

  auto s_in = [&](int s) { return reinterpret_cast<T*>(smem + s * Tile::kStageBytes); };
  auto s_low = [&](int s) { return reinterpret_cast<float*>(smem + s * Tile::kStageBytes + Tile::kInBytes); };
  T* s_hi = reinterpret_cast<T*>(smem + Tile::kStages * Tile::kStageBytes);
  T* s_lo = reinterpret_cast<T*>(smem + Tile::kStages * Tile::kStageBytes + Tile::kSplitBytes);
  auto issue = [&](int kt) {
    const int s = kt % Tile::kStages, m0 = row_begin + kt * BKM;
    load_tile<T, BKM, BJ, TH>(s_in(s), Tile::kLdIn, in, width, row_end, width, m0, j0, vec_in);
    load_tile<float, BKM, R, TH>(s_low(s), Tile::kLdLow, low, p.rank, row_end, p.rank, m0, 0, p.vec_low);
  };

  const Math math;
  typename Math::Acc acc;
  Math::zero(acc);
  const int k_tiles = ceil_div(row_end - row_begin, BKM);
#pragma unroll
  for (int s = 0; s < Tile::kStages - 1; ++s) {
    if (s < k_tiles) issue(s);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<Tile::kStages - 2>();
    __syncthreads();  // tile kt is visible; every warp is done with tile kt - 1 (and s_hi / s_lo)
    if (kt + Tile::kStages - 1 < k_tiles) issue(kt + Tile::kStages - 1);
    cp_async_commit();
    const int s = kt % Tile::kStages;
    if constexpr (Num<T>::kTensorCore) {
      // V split into 16-bit hi + lo (common.cuh); an fp16 tile beyond fp16's range is split again
      // divided by 2^exponent, and this stage's MMAs run on the accumulator divided by the same.
      const float* sv = s_low(s);
      bool beyond_fp16 = false;
      for (int e = threadIdx.x; e < BKM * R; e += TH) {
        const int m = e / R, q = e % R;
        beyond_fp16 |= split_element(s_hi + m * Tile::kLdSplit + q, s_lo + m * Tile::kLdSplit + q,
                                     sv[m * Tile::kLdLow + q]);
      }
      const int exponent = split_barrier<T, BKM, R, TH>(beyond_fp16, s_hi, s_lo, Tile::kLdSplit, sv, Tile::kLdLow);
      if (exponent != 0) Math::scale(acc, ldexpf(1.0f, -exponent));
      math.mma_stage(acc, s_in(s), s_hi, s_lo);
      if (exponent != 0) Math::scale(acc, ldexpf(1.0f, exponent));
    } else {
      math.mma_stage(acc, s_in(s), s_low(s));
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  float* s_c = reinterpret_cast<float*>(smem);
  math.store(acc, s_c);
  __syncthreads();
  // grad[j0 + jj, q] * s to its place: stored in T, or added to the fp32 sum of a row split.
  auto write = [&](T* out, float* sum, int64_t index, int jj, int q) {
    const float value = p.scaling * s_c[jj * Tile::kLdC + q];
    if (sum != nullptr) {
      atomicAdd(sum + index, value);
    } else {
      out[index] = Num<T>::from_float(value);
    }
  };
  const int64_t member_offset = static_cast<int64_t>(n) * p.rank * width;
  if (is_a) {  // dA[n] [r, d]: j is contiguous
    T* out = p.grad_A + member_offset;
    float* sum = p.grad_A_sum != nullptr ? p.grad_A_sum + member_offset : nullptr;
    for (int e = threadIdx.x; e < R * BJ; e += TH) {
      const int q = e / BJ, jj = e % BJ;
      if (q < p.rank && j0 + jj < p.d) write(out, sum, static_cast<int64_t>(q) * p.d + j0 + jj, jj, q);
    }
  } else {  // dB[n] [k, r]: q is contiguous
    T* out = p.grad_B + member_offset;
    float* sum = p.grad_B_sum != nullptr ? p.grad_B_sum + member_offset : nullptr;
    for (int e = threadIdx.x; e < BJ * R; e += TH) {
      const int jj = e / R, q = e % R;
      if (q < p.rank && j0 + jj < p.k) write(out, sum, static_cast<int64_t>(j0 + jj) * p.rank + q, jj, q);
    }
  }
}

template <class T, int kRankPad>
void launch_lora_grads_tile(const LoraGradParams<T>& p, cudaStream_t stream) {
  using Tile = LoraGradTile<T, kRankPad>;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.d, Tile::kBJ) + ceil_div(p.k, Tile::kBJ)),
                  static_cast<unsigned>(p.members),
                  static_cast<unsigned>(ceil_div(p.rows > 0 ? p.rows : 1, p.rows_per_split)));
  constexpr auto kernel = lora_grads_kernel<T, kRankPad>;
  once_per_device<kernel>(p.device, [] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile::kSmemBytes));
  });
  LORA_ENSEMBLE_LAUNCH(kernel, grid, Tile::kThreads, Tile::kSmemBytes, stream, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class T>
void launch_lora_grads(const LoraGradParams<T>& p, cudaStream_t stream) {
  if (p.rank <= 16) {
    launch_lora_grads_tile<T, 16>(p, stream);
  } else if (p.rank <= 32) {
    launch_lora_grads_tile<T, 32>(p, stream);
  } else if (p.rank <= 64) {
    launch_lora_grads_tile<T, 64>(p, stream);
  } else {
    launch_lora_grads_tile<T, 128>(p, stream);
  }
}

}  // namespace lora_ensemble
