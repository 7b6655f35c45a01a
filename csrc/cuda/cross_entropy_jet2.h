// Cross-entropy 2-jet CUDA kernel: plain CUDA (raw pointers + stream), no torch headers.
// Layout, all contiguous: z (N, V) logits; y (N,) int64 targets; z1, z2 (K, N, V) logit tangents (z2 may be
// nullptr: zero, not read). Writes the per-row terms rows0 (N,) (loss), rows1 and rows2 (K, N) (first and
// second derivative); an ignored row (y = ignore_index) gets zeros, a target outside [0, V) NaN. The caller
// sums the rows and divides by the number not ignored. Spec: fasthess/kernels/loss/reference.py.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace fasthess_cuda {

template <typename T>
cudaError_t cross_entropy_jet2_rows(const T* z, const int64_t* y, const T* z1, const T* z2, T* rows0, T* rows1,
                                    T* rows2, int64_t N, int64_t V, int64_t K, int64_t ignore_index,
                                    cudaStream_t stream);

}  // namespace fasthess_cuda
