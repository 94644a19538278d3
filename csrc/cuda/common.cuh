// Device building blocks shared by the lora_ensemble CUDA kernels: dtype conversions, asynchronous
// global->shared copies (cp.async, sm_80+), masked tile loaders, and the two macros through which a
// kernel declares its dynamic shared memory and is launched.
//
// load_tiles copies `count` [ROWS, COLS] windows of row-major global matrices (window i at
// g + i * g_stride) into shared memory laid out [ROWS][ld_smem] (window i at smem + i * smem_stride).
// Elements outside a matrix are written as zero, so edge tiles need no other masking in the math.
// With `vec` (the host checked that the leading dimension is a multiple of 16 bytes and the base
// pointer 16-byte aligned) each thread moves 16-byte chunks with cp.async, zero-filling chunks past
// the edge; otherwise it falls back to plain element loads and stores (ld_global).
//
// Host emulation (csrc/cuda/host_emulation.cuh, included first with LORA_ENSEMBLE_HOST_EMULATION
// defined) supplies its own cp.async helpers, ld_global, load_cg, the shared-memory declaration and the
// launch; everything else in the kernels is compiled unchanged on the CPU.
#pragma once

#include <array>
#include <cstdint>
#include <mutex>
#include <type_traits>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#ifndef LORA_ENSEMBLE_HOST_EMULATION
#include <mma.h>
#endif

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "lora_ensemble CUDA kernels need sm_80 or newer (cp.async, bf16 tensor cores): set TORCH_CUDA_ARCH_LIST"
#endif

// The kernel's dynamic shared memory, 128-byte aligned.
#ifndef LORA_ENSEMBLE_DYNAMIC_SMEM
#define LORA_ENSEMBLE_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif
// kernel<<<grid, threads, smem_bytes, stream>>>(params)
#ifndef LORA_ENSEMBLE_LAUNCH
#define LORA_ENSEMBLE_LAUNCH(kernel, grid, threads, smem_bytes, stream, params) \
  kernel<<<grid, threads, smem_bytes, stream>>>(params)
#endif

namespace lora_ensemble {

namespace wmma = nvcuda::wmma;

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int round_up(int a, int b) { return ceil_div(a, b) * b; }
__host__ __device__ constexpr int max3(int a, int b, int c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }
__host__ __device__ constexpr int min_int(int a, int b) { return a < b ? a : b; }

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

#ifdef LORA_ENSEMBLE_HOST_EMULATION
using emu::cp_async_16;
using emu::cp_async_commit;
using emu::cp_async_wait;
using emu::ld_global;
using emu::load_cg;
#else
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

// A plain element load of an operand (the fallback of load_tiles).
template <class T>
__device__ __forceinline__ T ld_global(const T* p) {
  return *p;
}

// A load that bypasses L1: data another CTA wrote in this launch (split-K partial sums).
__device__ __forceinline__ float load_cg(const float* p) { return __ldcg(p); }
#endif

// For i < count: smem[i * smem_stride + r * ld_smem + c] = g[i * g_stride + (row0 + r) * ld + col0 + c] for
// r < ROWS, c < COLS, zero where row0 + r >= rows or col0 + c >= cols. With vec: cols % (16 / sizeof(T)) == 0
// and col0 is a multiple of 16 / sizeof(T), so every 16-byte chunk is either wholly inside or wholly outside;
// g_stride and smem_stride keep 16-byte alignment. The threads share the count * ROWS * COLS elements.
// MAX_COUNT > 0 (count <= MAX_COUNT): the 16-byte copies' loop is unrolled, as the K loops need (a runtime
// trip count there costs ptxas dozens of registers); 0: a plain loop, as the epilogue's large expand
// tiles need (their unrolled copies cost as many).
template <class T, int ROWS, int COLS, int THREADS, int MAX_COUNT = 1>
__device__ __forceinline__ void load_tiles(T* smem, int smem_stride, int ld_smem, const T* g, int64_t g_stride,
                                           int64_t ld, int rows, int cols, int row0, int col0, int count, bool vec) {
  constexpr int kVec = 16 / sizeof(T);
  static_assert(COLS % kVec == 0, "tile width must be a whole number of 16-byte chunks");
  if (vec) {
    constexpr int kChunksPerRow = COLS / kVec;
    constexpr int kChunks = ROWS * kChunksPerRow;
    const int total = count * kChunks;
    auto copy = [&](int chunk) {
      const int i = chunk / kChunks, within = chunk % kChunks;
      const int r = within / kChunksPerRow;
      const int c = (within % kChunksPerRow) * kVec;
      const bool inside = row0 + r < rows && col0 + c < cols;
      const T* src = inside ? g + i * g_stride + (row0 + r) * ld + (col0 + c) : g;
      cp_async_16(smem + i * smem_stride + r * ld_smem + c, src, inside);
    };
    if constexpr (MAX_COUNT > 0) {
#pragma unroll
      for (int u = 0; u < ceil_div(MAX_COUNT * kChunks, THREADS); ++u) {
        const int chunk = static_cast<int>(threadIdx.x) + u * THREADS;
        if (chunk < total) copy(chunk);
      }
    } else {
      for (int chunk = static_cast<int>(threadIdx.x); chunk < total; chunk += THREADS) copy(chunk);
    }
  } else {
    constexpr int kElems = ROWS * COLS;
    const int total = count * kElems;
    for (int e = static_cast<int>(threadIdx.x); e < total; e += THREADS) {
      const int i = e / kElems, within = e % kElems;
      const int r = within / COLS;
      const int c = within % COLS;
      const bool inside = row0 + r < rows && col0 + c < cols;
      smem[i * smem_stride + r * ld_smem + c] =
          inside ? ld_global(g + i * g_stride + (row0 + r) * ld + (col0 + c)) : Num<T>::from_float(0.0f);
    }
  }
}

// One window: load_tiles with count 1.
template <class T, int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void load_tile(T* smem, int ld_smem, const T* g, int64_t ld, int rows, int cols, int row0,
                                          int col0, bool vec) {
  load_tiles<T, ROWS, COLS, THREADS>(smem, 0, ld_smem, g, 0, ld, rows, cols, row0, col0, 1, vec);
}

// Runs `set_up` once per kernel (a template argument: each instantiation has its own flags) and
// device: kernel attributes such as the dynamic shared memory limit are per device and need not be
// set again on every launch.
template <auto kKernel, class SetUp>
void once_per_device(int device, SetUp&& set_up) {
  static std::array<std::once_flag, 64> flags;
  if (device >= 0 && device < static_cast<int>(flags.size())) {
    std::call_once(flags[device], set_up);
  } else {
    set_up();
  }
}

// ---------------------------------------------------------------------------------------------
// 16-bit hi + lo split of an fp32 operand for the tensor cores (s * x A^T, dy B, x A^T): hi is the
// value rounded to the 16-bit dtype and lo the rounded remainder, so hi + lo carries ~16 mantissa
// bits. fp16 holds |v| <= 65504 only: when some value of a tile exceeds 2^15 the whole tile is
// split again divided by a power of two 2^e (the smallest that brings every finite value below
// 2^15), and the kernel multiplies its accumulator by 2^-e before the tile's dots and by 2^e after,
// exactly (powers of two). Tiles in range (the normal case) take one barrier and no extra work.

// 0 when |v| < 2^15 (or v is not finite), else the e with |v| 2^-e < 2^15.
__device__ __forceinline__ int fp16_split_exponent(float v) {
  const float a = fabsf(v);
  if (!(a >= 32768.0f) || !(a < INFINITY)) return 0;
  int e;
  frexpf(a, &e);  // a = m 2^e, m in [0.5, 1)
  return e - 15;
}

// *hi + *lo = v (16-bit parts); returns whether v is beyond the fp16 split range (fp16 only).
template <class T>
__device__ __forceinline__ bool split_element(T* hi, T* lo, float v) {
  const T h = Num<T>::from_float(v);
  const float h32 = Num<T>::to_float(h);
  *hi = h;
  *lo = Num<T>::from_float(fabsf(h32) < INFINITY ? v - h32 : 0.0f);  // no inf - inf = NaN
  if constexpr (std::is_same_v<T, __half>) return fp16_split_exponent(v) != 0;
  return false;
}

// hi/lo [r * ld_split + c] = split of factor * src[r * ld_src + c], r < ROWS, c < COLS (thread t takes
// the elements t, t + THREADS, ...).
template <class T, int ROWS, int COLS, int THREADS>
__device__ void split_tile(T* hi, T* lo, int ld_split, const float* src, int ld_src, float factor) {
  for (int e = threadIdx.x; e < ROWS * COLS; e += THREADS) {
    const int r = e / COLS, c = e % COLS;
    split_element(hi + r * ld_split + c, lo + r * ld_split + c, factor * src[r * ld_src + c]);
  }
}

// The rare fp16 path of split_barrier: the whole tile split again divided by the power of two that
// brings its largest finite value below 2^15. Kept out of line, so that the registers it needs do not
// count against the kernels' common path. Contains three CTA barriers; returns the exponent.
template <class T, int ROWS, int COLS, int THREADS>
__device__ __noinline__ int rescale_split_tile(T* hi, T* lo, int ld_split, const float* src, int ld_src) {
  __shared__ int s_exponent;
  if (threadIdx.x == 0) s_exponent = 0;
  __syncthreads();
  int local = 0;
  for (int e = threadIdx.x; e < ROWS * COLS; e += THREADS) {
    const int exponent = fp16_split_exponent(src[(e / COLS) * ld_src + e % COLS]);
    local = exponent > local ? exponent : local;
  }
  atomicMax(&s_exponent, local);
  __syncthreads();
  const int exponent = s_exponent;
  split_tile<T, ROWS, COLS, THREADS>(hi, lo, ld_split, src, ld_src, ldexpf(1.0f, -exponent));
  __syncthreads();
  return exponent;
}

// A CTA barrier after every thread has split its part of src [ROWS][COLS] into hi / lo (`beyond`: it
// met a value beyond the fp16 range). Returns the power of two e the tile was divided by: 0, except
// for fp16 when some thread met such a value, where the tile is split again times 2^-e. src must be
// unchanged since the first split.
template <class T, int ROWS, int COLS, int THREADS>
__device__ __forceinline__ int split_barrier(bool beyond, T* hi, T* lo, int ld_split, const float* src, int ld_src) {
  if constexpr (!std::is_same_v<T, __half>) {
    __syncthreads();
    return 0;
  } else {
    if (!__syncthreads_or(beyond)) return 0;
    return rescale_split_tile<T, ROWS, COLS, THREADS>(hi, lo, ld_split, src, ld_src);
  }
}

}  // namespace lora_ensemble
