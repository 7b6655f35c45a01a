// GELU 2-jet CUDA kernel: plain CUDA (raw pointers + stream), no torch headers.
// Layout, all contiguous: x (M,); x1, x2 (N, M); outputs y like x, y1 and y2 like x1.
// tanh_form: the tanh approximation, else the erf form. Spec: fasthess/kernels/gelu/reference.py.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace fasthess_cuda {

template <typename T>
cudaError_t gelu_jet2(const T* x, const T* x1, const T* x2, T* y, T* y1, T* y2, int64_t M, int64_t N, bool tanh_form,
                      cudaStream_t stream);

}  // namespace fasthess_cuda
