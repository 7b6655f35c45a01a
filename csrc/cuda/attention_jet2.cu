// Attention 2-jet on the GPU: one warp per (query row, batch·head, tangent), online softmax over
// chunks of 32 keys (one key per lane for the scores; each lane owns D/32 output columns for the
// weighted sums). Per row it keeps the running max m, l = Σw, a1 = Σw s1, a2 = Σw s2, b = Σw s1²
// and three D-vectors A = Σw v, C1 = Σw (s1 v + v1), C2 = Σw ((s2 + s1²) v + 2 s1 v1 + v2), all
// rescaled by exp(m_old − m_new) when the max grows; the derivation is in
// fasthess/kernels/attention/online.py. No T×T tensor exists. Accumulates in T (float or double).
#include "attention_jet2.h"

#include <math.h>

namespace fasthess_cuda {
namespace {

constexpr int kWarps = 4;  // query rows per block

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

template <typename T>
__device__ __forceinline__ T warp_max(T x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = fmax(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

template <typename T, int DPL>  // DPL: output columns per lane (D <= 32 * DPL)
__global__ void __launch_bounds__(kWarps * 32)
    attention_jet2_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                          const T* __restrict__ q1, const T* __restrict__ k1, const T* __restrict__ v1,
                          const T* __restrict__ q2, const T* __restrict__ k2, const T* __restrict__ v2,
                          const uint8_t* __restrict__ keep, T* __restrict__ o, T* __restrict__ o1,
                          T* __restrict__ o2, int H, int BH, int TQ, int TK, int D, T scale, bool causal) {
  extern __shared__ unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t bh = blockIdx.y, n = blockIdx.z;
  const int i = blockIdx.x * kWarps + warp;
  if (i >= TQ) return;  // the whole warp leaves; no block-wide barrier follows

  // the warp's query rows (primal and its tangent pair) in shared memory, read by every lane
  T* sq = smem + warp * 3 * D;
  T* sq1 = sq + D;
  T* sq2 = sq1 + D;
  const int64_t qoff = (bh * TQ + i) * (int64_t)D;
  const int64_t qtoff = ((n * BH + bh) * TQ + i) * (int64_t)D;
  for (int d = lane; d < D; d += 32) {
    sq[d] = q[qoff + d];
    sq1[d] = q1[qtoff + d];
    sq2[d] = q2[qtoff + d];
  }
  __syncwarp();

  const T neg_inf = -INFINITY;
  T m = neg_inf, l = 0, a1 = 0, a2 = 0, bb = 0;
  T acc0[DPL], acc1[DPL], acc2[DPL];
#pragma unroll
  for (int t = 0; t < DPL; ++t) acc0[t] = acc1[t] = acc2[t] = 0;

  const int hi = causal ? min(TK, i + 1) : TK;
  const int64_t kb = bh * TK * (int64_t)D;
  const int64_t ktb = (n * BH + bh) * TK * (int64_t)D;
  const uint8_t* kp = keep ? keep + (bh / H) * TK : nullptr;

  for (int j0 = 0; j0 < hi; j0 += 32) {
    const int j = j0 + lane;
    const bool vis = j < hi && (kp == nullptr || kp[j] != 0);
    T s = 0, s1 = 0, s2 = 0;
    if (vis) {
      const T* kr = k + kb + (int64_t)j * D;
      const T* k1r = k1 + ktb + (int64_t)j * D;
      const T* k2r = k2 + ktb + (int64_t)j * D;
      for (int d = 0; d < D; ++d) {
        const T kd = kr[d], k1d = k1r[d], k2d = k2r[d], qd = sq[d], q1d = sq1[d];
        s += qd * kd;
        s1 += q1d * kd + qd * k1d;
        s2 += sq2[d] * kd + T(2) * q1d * k1d + qd * k2d;
      }
      s *= scale;
      s1 *= scale;
      s2 *= scale;
    }
    const T m_new = fmax(m, warp_max(vis ? s : neg_inf));
    const T m_safe = m_new == neg_inf ? T(0) : m_new;  // nothing visible yet
    const T alpha = exp(m - m_safe);                    // 0 while m is -inf
    const T w = vis ? exp(s - m_safe) : T(0);
    const T ws1 = w * s1;
    l = l * alpha + warp_sum(w);
    a1 = a1 * alpha + warp_sum(ws1);
    a2 = a2 * alpha + warp_sum(w * s2);
    bb = bb * alpha + warp_sum(ws1 * s1);
#pragma unroll
    for (int t = 0; t < DPL; ++t) {
      acc0[t] *= alpha;
      acc1[t] *= alpha;
      acc2[t] *= alpha;
    }
    const int cnt = min(32, hi - j0);  // the same in every lane
    for (int jj = 0; jj < cnt; ++jj) {
      const T wj = __shfl_sync(0xffffffffu, w, jj);
      const T s1j = __shfl_sync(0xffffffffu, s1, jj);
      const T s2j = __shfl_sync(0xffffffffu, s2, jj);
      if (wj == T(0)) continue;  // masked key: uniform across the warp
      const T c1 = wj * s1j, c2 = wj * (s2j + s1j * s1j), c3 = T(2) * wj * s1j;
      const int64_t r = (int64_t)(j0 + jj) * D;
#pragma unroll
      for (int t = 0; t < DPL; ++t) {
        const int d = lane + 32 * t;
        if (d < D) {
          const T vv = v[kb + r + d], vv1 = v1[ktb + r + d], vv2 = v2[ktb + r + d];
          acc0[t] += wj * vv;
          acc1[t] += c1 * vv + wj * vv1;
          acc2[t] += c2 * vv + c3 * vv1 + wj * vv2;
        }
      }
    }
    m = m_new;
  }

  const T inv = l > T(0) ? T(1) / l : T(0);  // a row with no visible key gives zeros
  const T mu1 = a1 * inv, mu2 = a2 * inv, beta = bb * inv;
  const T c = mu2 + beta - T(2) * mu1 * mu1;
#pragma unroll
  for (int t = 0; t < DPL; ++t) {
    const int d = lane + 32 * t;
    if (d < D) {
      const T ov = acc0[t] * inv, e1 = acc1[t] * inv;
      o1[qtoff + d] = e1 - mu1 * ov;
      o2[qtoff + d] = acc2[t] * inv - T(2) * mu1 * e1 - c * ov;
      if (n == 0) o[qoff + d] = ov;
    }
  }
}

template <typename T, int DPL>
cudaError_t launch(const T* q, const T* k, const T* v, const T* q1, const T* k1, const T* v1, const T* q2,
                   const T* k2, const T* v2, const uint8_t* keep, T* o, T* o1, T* o2, int B, int H, int TQ, int TK,
                   int D, int N, T scale, bool causal, cudaStream_t stream) {
  const dim3 grid((TQ + kWarps - 1) / kWarps, B * H, N);
  const size_t smem = sizeof(T) * kWarps * 3 * D;
  attention_jet2_kernel<T, DPL><<<grid, kWarps * 32, smem, stream>>>(q, k, v, q1, k1, v1, q2, k2, v2, keep, o, o1,
                                                                      o2, H, B * H, TQ, TK, D, scale, causal);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t attention_jet2(const T* q, const T* k, const T* v, const T* q1, const T* k1, const T* v1,
                           const T* q2, const T* k2, const T* v2, const uint8_t* keep, T* o, T* o1, T* o2,
                           int B, int H, int TQ, int TK, int D, int N, T scale, bool causal,
                           cudaStream_t stream) {
  if (B * H > 65535 || N > 65535 || D < 1 || D > 256 || TQ < 0 || TK < 0) return cudaErrorInvalidValue;
  if (TQ == 0 || N == 0 || B * H == 0) return cudaSuccess;
#define FASTHESS_LAUNCH(DPL) \
  return launch<T, DPL>(q, k, v, q1, k1, v1, q2, k2, v2, keep, o, o1, o2, B, H, TQ, TK, D, N, scale, causal, stream)
  if (D <= 32) FASTHESS_LAUNCH(1);
  if (D <= 64) FASTHESS_LAUNCH(2);
  if (D <= 128) FASTHESS_LAUNCH(4);
  FASTHESS_LAUNCH(8);
#undef FASTHESS_LAUNCH
}

template cudaError_t attention_jet2<float>(const float*, const float*, const float*, const float*, const float*,
                                           const float*, const float*, const float*, const float*, const uint8_t*,
                                           float*, float*, float*, int, int, int, int, int, int, float, bool,
                                           cudaStream_t);
template cudaError_t attention_jet2<double>(const double*, const double*, const double*, const double*,
                                            const double*, const double*, const double*, const double*,
                                            const double*, const uint8_t*, double*, double*, double*, int, int,
                                            int, int, int, int, double, bool, cudaStream_t);

}  // namespace fasthess_cuda
