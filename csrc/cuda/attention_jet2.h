// Attention 2-jet CUDA kernel: plain CUDA (raw pointers + stream), no torch headers.
// Layout, all contiguous: q (B·H, Tq, D); k, v (B·H, Tk, D); q1, q2 (N, B·H, Tq, D);
// k1, v1, k2, v2 (N, B·H, Tk, D); each tangent may be nullptr (zero; one of q1, k1, v1 is given);
// keep (B, Tk) bytes, 1 = visible key, or nullptr; outputs o like q, o1 and o2 (N, B·H, Tq, D).
// Spec: fasthess/kernels/attention/reference.py.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace fasthess_cuda {

template <typename T>
cudaError_t attention_jet2(const T* q, const T* k, const T* v, const T* q1, const T* k1, const T* v1,
                           const T* q2, const T* k2, const T* v2, const uint8_t* keep, T* o, T* o1, T* o2,
                           int B, int H, int TQ, int TK, int D, int N, T scale, bool causal,
                           cudaStream_t stream);

}  // namespace fasthess_cuda
