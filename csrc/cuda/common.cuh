// Device building blocks shared by the lora_ensemble CUDA kernels: dtype conversions, asynchronous
// global->shared copies (cp.async, sm_80+), and a masked tile loader.
//
// load_tile copies a [ROWS, COLS] window of a row-major global matrix into shared memory laid out
// [ROWS][ld_smem]. Elements outside the matrix are written as zero, so edge tiles need no other
// masking in the math. With `vec` (the host checked that the leading dimension is a multiple of
// 16 bytes and the base pointer 16-byte aligned) each thread moves 16-byte chunks with cp.async,
// zero-filling chunks past the edge; otherwise it falls back to plain element loads and stores.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "lora_ensemble CUDA kernels need sm_80 or newer (cp.async, bf16 tensor cores): set TORCH_CUDA_ARCH_LIST"
#endif

namespace lora_ensemble {

namespace wmma = nvcuda::wmma;

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int round_up(int a, int b) { return ceil_div(a, b) * b; }
__host__ __device__ constexpr int max3(int a, int b, int c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

// float <-> storage dtype. kTensorCore: the dtype runs on WMMA 16x16x16 tiles (fp32 accumulate).
template <class T>
struct Num;

template <>
struct Num<float> {
  static constexpr bool kTensorCore = false;
  __device__ static float to_float(float v) { return v; }
  __device__ static float from_float(float v) { return v; }
};

template <>
struct Num<__half> {
  static constexpr bool kTensorCore = true;
  __device__ static float to_float(__half v) { return __half2float(v); }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct Num<__nv_bfloat16> {
  static constexpr bool kTensorCore = true;
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

// 16-byte asynchronous copy; when !pred nothing is read and the 16 shared bytes are zeroed.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool pred) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Wait until at most `kPending` committed groups of this thread are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// smem[r * ld_smem + c] = g[(row0 + r) * ld + col0 + c] for r < ROWS, c < COLS, zero where
// row0 + r >= rows or col0 + c >= cols. With vec: cols % (16 / sizeof(T)) == 0 and col0 is a
// multiple of 16 / sizeof(T), so every 16-byte chunk is either wholly inside or wholly outside.
template <class T, int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void load_tile(T* smem, int ld_smem, const T* g, int64_t ld, int rows, int cols, int row0,
                                          int col0, bool vec) {
  constexpr int kVec = 16 / sizeof(T);
  static_assert(COLS % kVec == 0, "tile width must be a whole number of 16-byte chunks");
  if (vec) {
    constexpr int kChunksPerRow = COLS / kVec;
    constexpr int kChunks = ROWS * kChunksPerRow;
#pragma unroll
    for (int i = 0; i < ceil_div(kChunks, THREADS); ++i) {
      const int chunk = static_cast<int>(threadIdx.x) + i * THREADS;
      if (kChunks % THREADS == 0 || chunk < kChunks) {
        const int r = chunk / kChunksPerRow;
        const int c = (chunk % kChunksPerRow) * kVec;
        const bool inside = row0 + r < rows && col0 + c < cols;
        const T* src = inside ? g + (row0 + r) * ld + (col0 + c) : g;
        cp_async_16(smem + r * ld_smem + c, src, inside);
      }
    }
  } else {
    constexpr int kElems = ROWS * COLS;
#pragma unroll 4
    for (int i = 0; i < ceil_div(kElems, THREADS); ++i) {
      const int e = static_cast<int>(threadIdx.x) + i * THREADS;
      if (kElems % THREADS == 0 || e < kElems) {
        const int r = e / COLS;
        const int c = e % COLS;
        const bool inside = row0 + r < rows && col0 + c < cols;
        smem[r * ld_smem + c] = inside ? g[(row0 + r) * ld + (col0 + c)] : Num<T>::from_float(0.0f);
      }
    }
  }
}

}  // namespace lora_ensemble
