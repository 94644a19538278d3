// Kernel arguments and host launchers of the lora_ensemble CUDA kernels (one declaration per dtype,
// defined in lora_kernels_{f32,f16,bf16}.cu). Sizes follow the backend contract: N members, M rows
// per member, d in, k out, r rank; every tensor contiguous and row-major. make_params.cuh fills them.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace lora_ensemble {

// The fused GEMM + LoRA kernel, in one of two roles:
//   forward:      out[n] = x[n] W0^T + b + s (x[n] A[n]^T) B[n]^T,  low[n] = x[n] A[n]^T
//                 (x = `in` [N, M, d], or [M, d] when shared; inner = d, cols = k)
//   backward dx:  out[n] = dy[n] W0 + s (dy[n] B[n]) A[n],          low[n] = dy[n] B[n]
//                 (dy = `in` [N, M, k]; inner = k, cols = d; when shared out is [M, d], summed over n)
// Filled by make_fused_params (make_params.cuh) from the plan of launch_policy.cuh.
template <class T>
struct FusedLoraGemmParams {
  // device pointers
  const T* in;       // x or dy: [N, M, inner] (forward + shared: [M, inner])
  const T* weight;   // W0 [k, d], or nullptr: no in W term (the low-rank update alone)
  const T* bias;     // [k] or nullptr (forward only)
  const T* base;     // forward only: a base output to add, [N, M, k] (shared: [M, k]), or nullptr
  const T* shrink;   // forward: A [N, r, d]; backward dx: B [N, k, r]   (in -> rank r)
  const T* expand;   // forward: B [N, k, r]; backward dx: A [N, r, d]   (rank r -> cols)
  T* out;            // [N, M, cols] (backward dx + shared: [M, cols])
  float* low;        // xa or dyb [N, M, r], fp32
  // sizes
  int members;       // N
  int rows;          // M
  int inner;         // the reduction length: d (forward) or k (backward dx)
  int cols;          // the output width: k (forward) or d (backward dx)
  int rank;          // r, 1..128
  float scaling;     // s
  bool shared;       // shared-input layout
  // tiling (launch_policy.cuh): grid = (row_tiles * col_tiles, member_groups, k_splits)
  int block_rows;    // BM the kernel is instantiated with: 16 or 64
  int tile_rows;     // rows of `in` one row tile covers, <= BM (stacked: of the N*M stacked rows)
  int row_tiles, col_tiles;
  int member_groups; // shared forward: groups of members, each computing in W0 once; else 1
  int k_splits;      // ranges of the reduction, k_per_split long (a multiple of the kernel's BK)
  int k_per_split;
  // split-K (k_splits > 1): fp32 partial sums of each range, added up in range order by the CTA of
  // the output tile that arrives last (so the result does not depend on the arrival order)
  float* partial_base;  // [member_groups][k_splits][base rows][cols]: in W0 (stacked: N*M rows; shared: M)
  float* partial_low;   // [k_splits][col_tiles][N][M][r]: in shrink (each column tile's CTAs their own copy)
  int* arrivals;        // [member_groups][row_tiles][col_tiles], zero before the launch
  int device;        // CUDA device index (per-device kernel attributes are set once)
  // Whether each operand may use 16-byte asynchronous copies (leading dim and base pointer aligned).
  bool vec_in, vec_weight, vec_shrink, vec_expand;
};

// The grouped LoRA weight gradients, one launch for every member and both outputs:
//   dA[n] = s dyb[n]^T x[n]  [r, d]        dB[n] = s dy[n]^T xa[n]  [k, r]
// both grad = s low^T in, with low = dyb or xa (fp32) and in = x or dy.
template <class T>
struct LoraGradParams {
  const T* x;          // [N, M, d] (shared: [M, d])
  const T* dy;         // [N, M, k]
  const float* xa;     // [N, M, r]
  const float* dyb;    // [N, M, r]
  T* grad_A;           // [N, r, d]
  T* grad_B;           // [N, k, r]
  // Row split (grid.z ranges of rows_per_split rows): partial sums atomically added into these fp32
  // outputs, zeroed by the caller (grad_A / grad_B unused); nullptr when there is one range.
  float* grad_A_sum;   // [N, r, d]
  float* grad_B_sum;   // [N, k, r]
  int members, rows, d, k, rank;
  int rows_per_split;  // rows one CTA reduces; >= rows when not split (launch_policy.cuh: grad_row_splits)
  float scaling;
  bool shared;
  int device;
  bool vec_x, vec_dy, vec_low;
};

// Largest rank the kernels are instantiated for (the rank is padded to 16, 32, 64 or 128).
constexpr int kMaxRank = 128;

template <class T>
void launch_fused_lora_gemm(const FusedLoraGemmParams<T>& p, bool forward, cudaStream_t stream);

template <class T>
void launch_lora_grads(const LoraGradParams<T>& p, cudaStream_t stream);

}  // namespace lora_ensemble
