// CPU stand-in for the CUDA runtime, so that the kernels of a .cu file run on the CPU in tests (no GPU here).
// Compile the .cu as C++20 with this folder first on the include path (tests/test_kernels_attention_hvp.py).
// Each block is run by blockDim.x std::threads, blocks one after another: __syncthreads is a barrier of the
// block's threads, a warp shuffle goes through an exchange buffer between two barriers of the warp's 32
// threads, extern __shared__ memory is one static buffer that the program defines in the kernels' namespace
// and points fasthess_emu::shared at (the bytes past a launch's dynamic size are poisoned under
// AddressSanitizer). Covers what csrc/cuda/attention_hvp.cu uses: 1-d blocks, dynamic shared
// memory, cudaLaunchKernel / cudaFuncSetAttribute on kernels taking one argument.
#pragma once
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <thread>
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
#define __shared__
#define __align__(n)

using std::exp;
using std::fmax;
using std::log;
using std::max;
using std::min;

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace fasthess_emu {
constexpr size_t kSharedBytes = 227 * 1024;  // H100/H200 opt-in limit per block
inline unsigned char* shared = nullptr;  // kSharedBytes bytes
inline std::barrier<>* block_barrier = nullptr;
struct Warp {
  std::unique_ptr<std::barrier<>> barrier;
  uint64_t buf[32];
};
inline std::vector<Warp> warps;
inline std::map<const void*, int> max_dynamic_shared;  // cudaFuncSetAttribute

template <typename T>
T shuffle(T v, int src_of_lane_xor, bool xor_mode) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  const unsigned tid = threadIdx.x, lane = tid % 32;
  Warp& w = warps[tid / 32];
  std::memcpy(&w.buf[lane], &v, sizeof(T));
  w.barrier->arrive_and_wait();
  T r;
  std::memcpy(&r, &w.buf[xor_mode ? (lane ^ src_of_lane_xor) % 32 : src_of_lane_xor % 32], sizeof(T));
  w.barrier->arrive_and_wait();
  return r;
}
}  // namespace fasthess_emu

inline void __syncthreads() { fasthess_emu::block_barrier->arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned /*mask: all lanes*/, T v, int lane_mask) {
  return fasthess_emu::shuffle(v, lane_mask, true);
}

template <typename T>
T __shfl_sync(unsigned, T v, int src) {
  return fasthess_emu::shuffle(v, src, false);
}

inline cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}

// FASTHESS_EMU_SMS: the SM count the launch heuristics see (tangent groups); default 4
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  const char* sms = std::getenv("FASTHESS_EMU_SMS");
  *value = attr == cudaDevAttrMultiProcessorCount ? (sms ? std::atoi(sms) : 4) : (int)fasthess_emu::kSharedBytes;
  return cudaSuccess;
}

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "error"; }

template <typename P>
cudaError_t cudaFuncSetAttribute(void (*f)(P), cudaFuncAttribute, int value) {
  if (value < 0 || (size_t)value > fasthess_emu::kSharedBytes) return cudaErrorInvalidValue;
  fasthess_emu::max_dynamic_shared[(const void*)f] = value;
  return cudaSuccess;
}

template <typename P>
cudaError_t cudaLaunchKernel(void (*f)(P), dim3 grid, dim3 block, void** args, size_t smem, cudaStream_t) {
  using namespace fasthess_emu;
  const auto it = max_dynamic_shared.find((const void*)f);
  const size_t limit = it == max_dynamic_shared.end() ? 48 * 1024 : (size_t)it->second;
  if (smem > limit || block.y != 1 || block.z != 1 || block.x % 32 != 0 || block.x > 1024)
    return cudaErrorInvalidConfiguration;
  const P params = *static_cast<P*>(args[0]);
  FASTHESS_EMU_UNPOISON(shared, kSharedBytes);
  FASTHESS_EMU_POISON(shared + smem, kSharedBytes - smem);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::memset(shared, 0xff, smem);  // shared memory starts as garbage (NaN) in every block
        std::barrier<> bar((std::ptrdiff_t)block.x);
        block_barrier = &bar;
        warps.clear();
        warps.resize(block.x / 32);
        for (auto& w : warps) w.barrier = std::make_unique<std::barrier<>>(32);
        std::vector<std::thread> threads;
        for (unsigned tid = 0; tid < block.x; ++tid)
          threads.emplace_back([=] {
            threadIdx = dim3(tid);
            blockIdx = dim3(x, y, z);
            blockDim = block;
            gridDim = grid;
            f(params);
          });
        for (auto& t : threads) t.join();
      }
  FASTHESS_EMU_UNPOISON(shared, kSharedBytes);
  return cudaSuccess;
}
