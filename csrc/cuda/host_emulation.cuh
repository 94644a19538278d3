// Host emulation of the CUDA features the lora_ensemble kernels use, for testing their indexing,
// masks, pipeline and barriers on a machine without a GPU (tests/test_cuda_backend.py). Not part of
// the extension: setup.py compiles only *.cu. The tests build csrc/cuda/host_emulation_entry.cpp
// with g++ -include host_emulation.cuh: the kernel headers compile unchanged, taking from here (by
// LORA_ENSEMBLE_HOST_EMULATION) the cp.async helpers, ld_global / load_cg, the dynamic shared memory
// (LORA_ENSEMBLE_DYNAMIC_SMEM) and the launch (LORA_ENSEMBLE_LAUNCH).
//
// Model: one std::thread per CUDA thread; every thread runs the CTAs of the grid one after another
// (in grid order, reversed, or shuffled: set_cta_order), in step, with std::barrier as __syncthreads
// (and __syncthreads_or, atomicMax on static __shared__ variables). cp.async copies are queued per
// thread and land only at the cp.async.wait_group that covers them (the latest moment the hardware
// allows), so a read before its wait sees the previous contents. Fresh shared memory is filled with
// 0xFF bytes (NaN in every dtype), so a read of shared memory nothing wrote poisons the result. A WMMA
// fragment is the full 16x16 tile in every lane (load/mma per lane, store by lane 0); loads and stores
// check the WMMA alignment rules and that the tile lies in the CTA's dynamic shared memory.
// Traffic: every byte an operand load (cp.async or ld_global) reads from a watched address range is
// counted for that range (watch / watched_bytes), so a test can count the reads of W0, x, A and B.
#pragma once
#include <cuda_runtime_api.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#define LORA_ENSEMBLE_HOST_EMULATION 1
#define LORA_ENSEMBLE_DYNAMIC_SMEM(name) unsigned char* name = emu::shared_memory()
#define LORA_ENSEMBLE_LAUNCH(kernel, grid, threads, smem_bytes, stream, params) \
  emu::launch(kernel, grid, threads, smem_bytes, params)

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __noinline__
#define __noinline__ __attribute__((noinline))
#endif
// A __shared__ variable is one per CTA; the emulation runs one CTA at a time, so one per process.
#undef __shared__
#define __shared__ static
// A failed check records the first message (emu::error(), cleared by emu::reset_error()); the emulation
// goes on without the offending access, so that a bug shows up as a test failure, not a crash.
#define EMU_CHECK(cond, msg) (static_cast<bool>(cond) || emu::fail(__FILE__, __LINE__, #cond, msg))
#define TORCH_CHECK(cond, ...) (void)EMU_CHECK(cond, "TORCH_CHECK")
#define C10_CUDA_CHECK(x) ((void)0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 gridDim;

namespace emu {
inline std::mutex g_error_mutex;
inline std::string g_error;
inline bool fail(const char* file, int line, const char* cond, const char* msg) {
  std::lock_guard<std::mutex> lock(g_error_mutex);
  if (g_error.empty()) g_error = std::string(file) + ":" + std::to_string(line) + ": " + cond + " (" + msg + ")";
  return false;
}
inline const char* error() { return g_error.empty() ? nullptr : g_error.c_str(); }

inline std::barrier<>* g_barrier = nullptr;
inline std::atomic<int> g_or_slots[2];  // __syncthreads_or
inline thread_local int or_calls = 0;
inline unsigned char* g_smem = nullptr;
inline int g_smem_bytes = 0;
inline unsigned char* shared_memory() { return g_smem; }

// Watched address ranges [begin, end) and the bytes operand loads read from each.
constexpr int kWatches = 8;
inline const unsigned char* g_watch_begin[kWatches];
inline const unsigned char* g_watch_end[kWatches];
inline std::atomic<long long> g_watch_bytes[kWatches];
inline void watch(int slot, const void* begin, long long bytes) {
  g_watch_begin[slot] = static_cast<const unsigned char*>(begin);
  g_watch_end[slot] = g_watch_begin[slot] + bytes;
  g_watch_bytes[slot] = 0;
}
inline void unwatch_all() {
  for (int i = 0; i < kWatches; ++i) {
    g_watch_begin[i] = g_watch_end[i] = nullptr;
    g_watch_bytes[i] = 0;
  }
}
inline long long watched_bytes(int slot) { return g_watch_bytes[slot]; }
inline void count_read(const void* address, int bytes) {
  const auto* a = static_cast<const unsigned char*>(address);
  for (int i = 0; i < kWatches; ++i) {
    if (a >= g_watch_begin[i] && a < g_watch_end[i]) g_watch_bytes[i] += bytes;
  }
}

struct Copy { void* dst; const void* src; bool pred; };
inline thread_local std::vector<Copy> pending;
inline thread_local std::deque<std::vector<Copy>> groups;

inline void cp_async_16(void* smem, const void* gmem, bool pred) {
  EMU_CHECK(reinterpret_cast<uintptr_t>(smem) % 16 == 0, "cp.async dst alignment");
  EMU_CHECK(!pred || reinterpret_cast<uintptr_t>(gmem) % 16 == 0, "cp.async src alignment");
  const auto* dst = static_cast<unsigned char*>(smem);
  if (EMU_CHECK(dst >= g_smem && dst + 16 <= g_smem + g_smem_bytes, "cp.async dst in smem")) {
    pending.push_back({smem, gmem, pred});
    if (pred) count_read(gmem, 16);
  }
}
inline void cp_async_commit() { groups.push_back(std::move(pending)); pending.clear(); }
template <int N>
inline void cp_async_wait() {
  while ((int)groups.size() > N) {
    for (const Copy& c : groups.front()) {
      if (c.pred) std::memcpy(c.dst, c.src, 16); else std::memset(c.dst, 0, 16);
    }
    groups.pop_front();
  }
}

// An operand's element load outside cp.async (the fallback of load_tiles): counted like a copy.
template <class T>
inline T ld_global(const T* p) {
  count_read(p, static_cast<int>(sizeof(T)));
  return *p;
}
// The L1-bypassing load of split-K partials: a plain load here (one CTA runs at a time).
inline float load_cg(const float* p) { return *p; }

inline void reset_error() { g_error.clear(); }

// The order the CTAs of a grid run in: 0 grid order (x fastest, then y, then z), 1 reversed,
// 2 shuffled with the seed. Split-K's last-arriving CTA is then each split in turn.
inline int g_cta_order = 0;
inline unsigned g_cta_seed = 0;
inline void set_cta_order(int order, unsigned seed) {
  g_cta_order = order;
  g_cta_seed = seed;
}

// kernel<<<grid, threads, smem_bytes>>>(p), run to completion.
template <class P>
void launch(void (*kernel)(P), dim3 grid, int threads, int smem_bytes, const P& p) {
  EMU_CHECK(smem_bytes <= 166912, "dynamic shared memory over the sm_80 limit (163 KB)");
  EMU_CHECK(grid.x >= 1 && grid.x <= 2147483647u && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 && grid.z <= 65535,
            "grid within the CUDA limits");
  if (!EMU_CHECK(smem_bytes % 128 == 0, "shared memory size is a multiple of 128 bytes")) return;
  std::vector<uint3> ctas;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) ctas.push_back({bx, by, bz});
  if (g_cta_order == 1) {
    std::reverse(ctas.begin(), ctas.end());
  } else if (g_cta_order == 2) {
    std::mt19937 random(g_cta_seed);
    std::shuffle(ctas.begin(), ctas.end(), random);
  }
  std::barrier<> bar(threads);
  unsigned char* buf = static_cast<unsigned char*>(std::aligned_alloc(128, smem_bytes));
  g_barrier = &bar;
  g_or_slots[0] = g_or_slots[1] = 0;
  g_smem = buf;
  g_smem_bytes = smem_bytes;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      threadIdx = {unsigned(t), 0, 0};
      gridDim = grid;
      for (const uint3& cta : ctas) {
        if (t == 0) std::memset(buf, 0xFF, smem_bytes);
        bar.arrive_and_wait();
        blockIdx = cta;
        kernel(p);
        EMU_CHECK(pending.empty() && groups.empty(), "cp.async copies never waited for");
        pending.clear();
        groups.clear();
        bar.arrive_and_wait();
      }
    });
  }
  for (auto& th : pool) th.join();
  std::free(buf);
}
}  // namespace emu

inline void __syncthreads() { emu::g_barrier->arrive_and_wait(); }

// __syncthreads_or: a barrier that returns whether pred was non-zero in any thread of the CTA. Call k
// uses slot k % 2; thread 0 clears the other slot between the two barriers, when no thread can still
// be reading it (the previous call) or writing it (the next call).
inline int __syncthreads_or(int pred) {
  const int slot = emu::or_calls++ % 2;
  if (pred) emu::g_or_slots[slot].store(1);
  emu::g_barrier->arrive_and_wait();
  const int any = emu::g_or_slots[slot].load();
  if (threadIdx.x == 0) emu::g_or_slots[1 - slot].store(0);
  emu::g_barrier->arrive_and_wait();
  return any;
}

inline float atomicAdd(float* address, float value) { return std::atomic_ref<float>(*address).fetch_add(value); }
inline int atomicAdd(int* address, int value) { return std::atomic_ref<int>(*address).fetch_add(value); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

inline int atomicMax(int* address, int value) {
  std::atomic_ref<int> target(*address);
  int old = target.load();
  while (old < value && !target.compare_exchange_weak(old, value)) {
  }
  return old;
}

namespace nvcuda { namespace wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {}; struct row_major {}; struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int num_elements = 256;  // every lane holds the whole tile
  union { float v[16][16]; float x[256]; };
};
template <class T> inline float tof(T x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else if constexpr (std::is_same_v<T, __half>) return __half2float(x);
  else return __bfloat162float(x);
}
// WMMA alignment rules, and that a 16 x 16 tile at p with leading dimension ldm lies in shared memory.
template <class T> inline bool check_tile(const T* p, unsigned ldm) {
  EMU_CHECK(reinterpret_cast<uintptr_t>(p) % 32 == 0, "wmma pointer must be 256-bit aligned");
  EMU_CHECK((ldm * sizeof(T)) % 16 == 0, "wmma ldm must be a multiple of 16 bytes");
  return EMU_CHECK((const unsigned char*)p >= emu::g_smem &&
                   (const unsigned char*)(p + 15 * ldm + 16) <= emu::g_smem + emu::g_smem_bytes, "wmma tile in smem");
}
template <class Use, class T, class L>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  if (!check_tile(p, ldm)) return;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.v[i][j] = tof(std::is_same_v<L, row_major> ? p[i * ldm + j] : p[j * ldm + i]);
}
template <class T, class La, class Lb>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, La>& a,
                     const fragment<matrix_b, 16, 16, 16, T, Lb>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  float r[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.v[i][j];
      for (int k = 0; k < 16; ++k) s += a.v[i][k] * b.v[k][j];
      r[i][j] = s;
    }
  std::memcpy(d.v, r, sizeof(r));
}
// An accumulator fragment loaded from fp32 shared memory (same element placement as mma_sync's result).
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout) {
  if (!check_tile(p, ldm)) return;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.v[i][j] = layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i];
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  if (!check_tile(p, ldm) || threadIdx.x % 32 != 0) return;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) p[i * ldm + j] = layout == mem_row_major ? f.v[i][j] : f.v[j][i];
}
template <class F> inline void fill_fragment(F& f, float v) { for (auto& row : f.v) for (auto& x : row) x = v; }
}}  // namespace nvcuda::wmma
