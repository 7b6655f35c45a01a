// One-hot weight tangent CUDA kernel: plain CUDA (raw pointers + stream), no torch headers.
// x (M, in) contiguous (the rows of x.reshape(-1, in)); rows, cols (K,) int64 on the device, already checked
// (rows[k] < out_features; rows[k] < 0: a zero direction, else 0 <= cols[k] < in); out (K, M, out_features)
// contiguous, every entry written: out[k, m, o] = x[m, cols[k]] if o == rows[k] else 0. A copy: any element
// type of elem_size 2, 4 or 8 bytes (zero is all bits clear). Spec: fasthess/kernels/linear/reference.py.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace fasthess_cuda {

cudaError_t onehot_weight_tangent(const void* x, const int64_t* rows, const int64_t* cols, void* out, int64_t K,
                                  int64_t M, int64_t in, int64_t out_features, int elem_size, cudaStream_t stream);

}  // namespace fasthess_cuda
