// Hutchinson accumulation CUDA kernels: plain CUDA (raw pointers + stream), no torch headers.
// Merge k samples s_j = z_j ⊙ hz_j (j < k) into running statistics over `count` earlier samples, in place:
// mean, m2 (n,); z, hz (k, n), all contiguous, of one type T (float or double).
//  * hutchinson_update: z given;
//  * hutchinson_update_seeded: z_j regenerated from (seed_hash, first_probe + j, coordinate) by the probe
//    hash of csrc/probe_hash.h (seed_hash = hash32(seed mod 2^32)), never stored.
// Specs: fasthess/kernels/hutchinson/reference.py, fasthess/kernels/linear/reference.py.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace fasthess_cuda {

template <typename T>
cudaError_t hutchinson_update(T* mean, T* m2, const T* z, const T* hz, int64_t k, int64_t n, int64_t count,
                              cudaStream_t stream);

template <typename T>
cudaError_t hutchinson_update_seeded(T* mean, T* m2, const T* hz, int64_t k, int64_t n, uint32_t seed_hash,
                                     int64_t first_probe, int64_t count, cudaStream_t stream);

}  // namespace fasthess_cuda
