// Hutchinson accumulation on the GPU; math as in csrc/fasthess_ops.cpp and csrc/linear_ops.cpp. Each
// thread takes kPerThread coordinates i of a tile (i = tile + threadIdx.x + v · kThreads: every load of
// row j coalesced across the warp, kPerThread independent loads in flight; grid-stride over tiles):
// Welford over the k new samples s_j = z_j[i] hz_j[i], then Chan et al.'s merge into (mean[i], m2[i])
// over `count` earlier samples: δ = b̄ - mean, m2 += M2_b + δ² count k / (count + k),
// mean += δ k / (count + k). The seeded kernel computes z_j[i] from the probe hash (csrc/probe_hash.h,
// shared with the CPU kernel) instead of reading it; the per-probe work (the probe's key, 1 / (j + 1))
// is shared by a thread's coordinates. Accumulates in T (float or double).
#include "hutchinson_update.h"

#include "../probe_hash.h"

namespace fasthess_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;
constexpr int64_t kTile = (int64_t)kThreads * kPerThread;
constexpr int64_t kMaxBlocks = 65535;  // grid-stride beyond this

// SEEDED: z_j[i] = ±1 from the hash of (seed_hash, first_probe + j, i); else read from z.
template <typename T, bool SEEDED>
__global__ void __launch_bounds__(kThreads)
    hutchinson_update_kernel(T* __restrict__ mean, T* __restrict__ m2, const T* __restrict__ z,
                             const T* __restrict__ hz, int64_t k, int64_t n, uint32_t seed_hash,
                             int64_t first_probe, T frac, T cross) {
  for (int64_t tile = (int64_t)blockIdx.x * kTile; tile < n; tile += (int64_t)gridDim.x * kTile) {
    const int64_t i0 = tile + threadIdx.x;
    T bmean[kPerThread], bm2[kPerThread];
#pragma unroll
    for (int v = 0; v < kPerThread; ++v) bmean[v] = bm2[v] = T(0);
    for (int64_t j = 0; j < k; ++j) {
      const T inv = T(1) / T(j + 1);
      const uint32_t key = SEEDED ? fasthess_hash::probe_key(seed_hash, first_probe + j) : 0u;
      const T* row = hz + j * n;
#pragma unroll
      for (int v = 0; v < kPerThread; ++v) {
        const int64_t i = i0 + (int64_t)v * kThreads;
        if (i < n) {
          const T h = row[i];
          T s;
          if constexpr (SEEDED) {
            s = fasthess_hash::probe_sign_bit(key, i) ? -h : h;
          } else {
            s = z[j * n + i] * h;
          }
          const T d = s - bmean[v];
          bmean[v] += d * inv;
          bm2[v] += d * (s - bmean[v]);
        }
      }
    }
#pragma unroll
    for (int v = 0; v < kPerThread; ++v) {
      const int64_t i = i0 + (int64_t)v * kThreads;
      if (i < n) {
        const T mu = mean[i];
        const T delta = bmean[v] - mu;
        m2[i] = m2[i] + (bm2[v] + delta * delta * cross);
        mean[i] = mu + delta * frac;
      }
    }
  }
}

inline unsigned blocks_for(int64_t n) {
  const int64_t b = (n + kTile - 1) / kTile;
  return (unsigned)(b < kMaxBlocks ? b : kMaxBlocks);
}

// The merge weights k / (count + k) and count k / (count + k), in double on the host.
template <typename T>
void weights(int64_t k, int64_t count, T* frac, T* cross) {
  const double total = static_cast<double>(count) + static_cast<double>(k);
  *frac = static_cast<T>(static_cast<double>(k) / total);
  *cross = static_cast<T>(static_cast<double>(count) * static_cast<double>(k) / total);
}

}  // namespace

template <typename T>
cudaError_t hutchinson_update(T* mean, T* m2, const T* z, const T* hz, int64_t k, int64_t n, int64_t count,
                              cudaStream_t stream) {
  if (k < 0 || n < 0 || count < 0) return cudaErrorInvalidValue;
  if (k == 0 || n == 0) return cudaSuccess;
  T frac, cross;
  weights(k, count, &frac, &cross);
  hutchinson_update_kernel<T, false><<<blocks_for(n), kThreads, 0, stream>>>(mean, m2, z, hz, k, n, 0u, 0, frac,
                                                                            cross);
  return cudaGetLastError();
}

template <typename T>
cudaError_t hutchinson_update_seeded(T* mean, T* m2, const T* hz, int64_t k, int64_t n, uint32_t seed_hash,
                                     int64_t first_probe, int64_t count, cudaStream_t stream) {
  if (k < 0 || n < 0 || count < 0 || first_probe < 0 || n > (int64_t(1) << 32)) return cudaErrorInvalidValue;
  if (k == 0 || n == 0) return cudaSuccess;
  T frac, cross;
  weights(k, count, &frac, &cross);
  hutchinson_update_kernel<T, true><<<blocks_for(n), kThreads, 0, stream>>>(mean, m2, nullptr, hz, k, n, seed_hash,
                                                                           first_probe, frac, cross);
  return cudaGetLastError();
}

template cudaError_t hutchinson_update<float>(float*, float*, const float*, const float*, int64_t, int64_t, int64_t,
                                              cudaStream_t);
template cudaError_t hutchinson_update<double>(double*, double*, const double*, const double*, int64_t, int64_t,
                                               int64_t, cudaStream_t);
template cudaError_t hutchinson_update_seeded<float>(float*, float*, const float*, int64_t, int64_t, uint32_t, int64_t,
                                                     int64_t, cudaStream_t);
template cudaError_t hutchinson_update_seeded<double>(double*, double*, const double*, int64_t, int64_t, uint32_t,
                                                      int64_t, int64_t, cudaStream_t);

}  // namespace fasthess_cuda
