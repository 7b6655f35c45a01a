// Attention HVP CUDA kernels: plain CUDA (raw pointers + stream), no torch headers.
// Layout, all contiguous: q, dout (B·H, Tq, D); k, v (B·H, Tk, D); q1, dout1 (N, B·H, Tq, D);
// k1, v1 (N, B·H, Tk, D); keep (B, Tk) bytes, 1 = visible key, or nullptr. Outputs dq like q, dk, dv
// like k, dq1 like q1, dk1, dv1 like k1: ZERO on entry (the kernels accumulate into them). workspace:
// attention_hvp_workspace_elems(...) elements of T (the row statistics). Any head dim D >= 1 (the
// kernels stream D in chunks). Spec: fasthess/kernels/attention_hvp/reference.py.
#pragma once
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

namespace fasthess_cuda {

// Row statistics: (lse, D) per query row of each head, (mu1, D1) per query row of each head and tangent.
inline size_t attention_hvp_workspace_elems(int B, int H, int TQ, int N) {
  return 2 * (size_t)B * H * TQ * (1 + (size_t)N);
}

template <typename T>
cudaError_t attention_hvp(const T* q, const T* k, const T* v, const T* dout, const T* q1, const T* k1, const T* v1,
                          const T* dout1, const uint8_t* keep, T* dq, T* dk, T* dv, T* dq1, T* dk1, T* dv1,
                          T* workspace, int B, int H, int TQ, int TK, int D, int N, T scale, bool causal,
                          cudaStream_t stream);

}  // namespace fasthess_cuda
