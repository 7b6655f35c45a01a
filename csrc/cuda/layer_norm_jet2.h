// Layer-norm 2-jet CUDA kernel: plain CUDA (raw pointers + stream), no torch headers.
// Layout, all contiguous: x (R, D) (the rows of x.reshape(-1, D)); weight, bias (D,) or nullptr;
// x1 (N, R, D), x2 like x1 or nullptr (zero, skipped); outputs y like x, y1 and y2 like x1.
// Spec: fasthess/kernels/layer_norm/reference.py.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace fasthess_cuda {

template <typename T>
cudaError_t layer_norm_jet2(const T* x, const T* weight, const T* bias, const T* x1, const T* x2, T* y, T* y1,
                            T* y2, int64_t R, int64_t D, int64_t N, double eps, cudaStream_t stream);

}  // namespace fasthess_cuda
