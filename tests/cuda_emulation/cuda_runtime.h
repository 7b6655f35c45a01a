// CPU stand-in for the CUDA runtime: the kernels of csrc/cuda/*.cu run on the CPU in tests (no GPU needed).
//
// How it is used (tests/cuda_emulation/emulator.py, tests/test_cuda_emulated.py): each .cu is first rewritten
// by emulator.py (a launch `k<<<grid, block, smem, stream>>>(args)` becomes fasthess_emu::launch(k, grid,
// block, smem, stream)(args); `extern __shared__ T name[]` points at the block's dynamic shared memory,
// `__shared__ T name[n]` at a static slot of the same buffer), compiled as C++20 with this folder first on the
// include path together with tests/cuda_emulation/shims.cpp (one uniform entry point per launcher), and linked
// with driver.cpp into a program (plain: every kernel; ASan+UBSan or TSan: the kernel under test), once per
// test session; Python calls a launcher by name on tensors' bytes, the program in a subprocess.
//
// Semantics: the blocks of a grid run one after another; each block is run by blockDim.x·y·z std::threads
// (threadIdx from the linear id, x fastest; warp w = linear ids 32w..32w+31). __syncthreads is a barrier of
// the block's threads, __syncwarp and every __shfl_*_sync one of the warp's threads (a shuffle goes through an
// exchange buffer between two warp barriers). A thread that returns leaves the barriers (as on sm_70+); a
// shuffle that reads a lane which has returned aborts the program (undefined in CUDA). Shared memory (dynamic
// and static) starts as all-ones bytes (NaN) in every block, so a read before the write shows; under
// AddressSanitizer the bytes past the launch's dynamic size and the static slots are poisoned, under
// ThreadSanitizer a missing barrier between a write and a read of shared memory is a reported race. A launch
// with a bad configuration (block over 1024 threads, grid.y/z over 65535, dynamic shared memory over the
// limit set by cudaFuncSetAttribute, 48 KiB by default) runs nothing and sets the error that
// cudaGetLastError returns. FASTHESS_EMU_SMS sets the multiprocessor count the launch heuristics see
// (default 4). Not modelled: __launch_bounds__ limits, register pressure, tensor cores, warp-synchronous code
// without __syncwarp/shuffles (lanes are independent threads here, as they may be on sm_70+).
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <new>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define FASTHESS_EMU_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define FASTHESS_EMU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define FASTHESS_EMU_POISON(p, n) ((void)(p), (void)(n))
#define FASTHESS_EMU_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n)

using std::erfc;
using std::exp;
using std::fabs;
using std::fmax;
using std::log;
using std::max;
using std::min;
using std::sqrt;

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
constexpr int warpSize = 32;

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace fasthess_emu {
constexpr size_t kSharedBytes = 227 * 1024;  // H100/H200 opt-in limit per block
alignas(64) inline unsigned char shared[kSharedBytes];
inline size_t dynamic_bytes = 0;           // dynamic shared memory of the running launch: [0, dynamic_bytes)
inline size_t static_top = kSharedBytes;   // static slots are carved downwards from the end
inline std::map<const void*, size_t> static_slots;  // declaration tag -> offset, for the running launch
inline std::mutex static_mutex;
inline std::barrier<>* block_barrier = nullptr;
inline cudaError_t last_error = cudaSuccess;

struct Warp {
  std::unique_ptr<std::barrier<>> barrier;
  uint64_t buf[32];
  std::atomic<bool> gone[32];
};
inline std::unique_ptr<Warp[]> warps;

inline unsigned linear_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s (block %u,%u,%u thread %u,%u,%u)\n", what, blockIdx.x, blockIdx.y,
               blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
  std::abort();
}

// `__shared__ A name;` (A an array type): a slot of the block's shared memory, one per declaration (tag) and launch.
template <typename A>
A* static_shared(const void* tag) {
  std::lock_guard<std::mutex> lock(static_mutex);
  auto it = static_slots.find(tag);
  if (it == static_slots.end()) {
    const size_t align = alignof(A) > 16 ? alignof(A) : 16;
    const size_t top = (static_top - sizeof(A)) / align * align;
    if (sizeof(A) > static_top || top < dynamic_bytes) fail("static + dynamic shared memory over the limit");
    FASTHESS_EMU_UNPOISON(shared + top, sizeof(A));
    static_top = top;
    it = static_slots.emplace(tag, top).first;
  }
  return std::launder(reinterpret_cast<A*>(shared + it->second));
}

template <typename T>
T shuffle(T v, int src_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  const unsigned tid = linear_tid(), lane = tid % 32;
  Warp& w = warps[tid / 32];
  std::memcpy(&w.buf[lane], &v, sizeof(T));
  w.barrier->arrive_and_wait();
  if (w.gone[src_lane].load()) fail("a shuffle reads a lane that has returned");
  T r;
  std::memcpy(&r, &w.buf[src_lane], sizeof(T));
  w.barrier->arrive_and_wait();
  return r;
}

inline std::map<const void*, int>& max_dynamic_shared() {  // cudaFuncSetAttribute
  static std::map<const void*, int> m;
  return m;
}

// Runs body() on every thread of every block of the grid (see the header comment).
template <typename F>
cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, F&& body) {
  const auto it = max_dynamic_shared().find(kernel);
  const size_t limit = it == max_dynamic_shared().end() ? 48 * 1024 : (size_t)it->second;
  const size_t nthreads = (size_t)block.x * block.y * block.z;
  if (smem > limit || nthreads == 0 || nthreads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
    return last_error = cudaErrorInvalidConfiguration;
  const unsigned nwarps = (unsigned)(nthreads + 31) / 32;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        FASTHESS_EMU_UNPOISON(shared, kSharedBytes);
        std::memset(shared, 0xff, kSharedBytes);  // shared memory starts as garbage (NaN) in every block
        FASTHESS_EMU_POISON(shared + smem, kSharedBytes - smem);
        dynamic_bytes = smem;
        static_top = kSharedBytes;
        static_slots.clear();
        std::barrier<> bar((std::ptrdiff_t)nthreads);
        block_barrier = &bar;
        warps.reset(new Warp[nwarps]);
        for (unsigned w = 0; w < nwarps; ++w) {
          warps[w].barrier = std::make_unique<std::barrier<>>((std::ptrdiff_t)std::min<size_t>(32, nthreads - 32 * w));
          for (auto& g : warps[w].gone) g = false;
        }
        std::vector<std::thread> threads;
        threads.reserve(nthreads);
        for (unsigned tid = 0; tid < nthreads; ++tid)
          threads.emplace_back([&, tid, x, y, z] {
            threadIdx = dim3(tid % block.x, tid / block.x % block.y, tid / (block.x * block.y));
            blockIdx = dim3(x, y, z);
            blockDim = block;
            gridDim = grid;
            body();
            Warp& w = warps[tid / 32];
            w.gone[tid % 32] = true;  // a returned thread leaves its warp's and its block's barriers
            w.barrier->arrive_and_drop();
            block_barrier->arrive_and_drop();
          });
        for (auto& t : threads) t.join();
      }
  FASTHESS_EMU_UNPOISON(shared, kSharedBytes);
  return cudaSuccess;
}

// k<<<grid, block, smem, stream>>>(args...) is rewritten to launch(k, grid, block, smem, stream)(args...).
template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A&&... args) const {
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    run_grid((const void*)kernel, grid, block, smem, [&] { std::apply(kernel, params); });
  }
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return {kernel, grid, block, smem};
}
// The launchers' uniform entry points (tests/cuda_emulation/shims.cpp), by name, for driver.cpp:
// buffers (nullptr for an absent one), integer and floating arguments; returns the cudaError_t.
using Entry = int (*)(void** buf, const int64_t* i, const double* f);
inline std::map<std::string, Entry>& entries() {
  static std::map<std::string, Entry> m;
  return m;
}
}  // namespace fasthess_emu

inline void __syncthreads() { fasthess_emu::block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned /*mask: all lanes*/ = 0xffffffffu) {
  fasthess_emu::warps[fasthess_emu::linear_tid() / 32].barrier->arrive_and_wait();
}

template <typename T>
T __shfl_sync(unsigned /*mask: all lanes*/, T v, int src, int width = 32) {
  const int lane = (int)(fasthess_emu::linear_tid() % 32);
  return fasthess_emu::shuffle(v, (lane & ~(width - 1)) + (src & (width - 1)));
}

template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32) {
  const int lane = (int)(fasthess_emu::linear_tid() % 32), src = lane ^ lane_mask;
  return fasthess_emu::shuffle(v, (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : lane);
}

template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  const int lane = (int)(fasthess_emu::linear_tid() % 32), src = lane + (int)delta;
  return fasthess_emu::shuffle(v, src / width == lane / width ? src : lane);  // past the segment: own value
}

template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  const int lane = (int)(fasthess_emu::linear_tid() % 32), src = lane - (int)delta;
  return fasthess_emu::shuffle(v, src >= 0 && src / width == lane / width ? src : lane);
}

inline cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  const char* sms = std::getenv("FASTHESS_EMU_SMS");
  *value = attr == cudaDevAttrMultiProcessorCount ? (sms ? std::atoi(sms) : 4) : (int)fasthess_emu::kSharedBytes;
  return cudaSuccess;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = fasthess_emu::last_error;
  fasthess_emu::last_error = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "error"; }

template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*f)(P...), cudaFuncAttribute, int value) {
  if (value < 0 || (size_t)value > fasthess_emu::kSharedBytes) return cudaErrorInvalidValue;
  fasthess_emu::max_dynamic_shared()[(const void*)f] = value;
  return cudaSuccess;
}

template <typename... P>
cudaError_t cudaLaunchKernel(void (*f)(P...), dim3 grid, dim3 block, void** args, size_t smem, cudaStream_t) {
  return [&]<size_t... I>(std::index_sequence<I...>) {
    const std::tuple<std::decay_t<P>...> params(*static_cast<std::decay_t<P>*>(args[I])...);
    return fasthess_emu::run_grid((const void*)f, grid, block, smem, [&] { std::apply(f, params); });
  }(std::index_sequence_for<P...>{});
}
