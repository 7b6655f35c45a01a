// Attention 2-jet on the GPU, online softmax over chunks of 32 keys (one key per lane for the
// scores; each lane owns D/32 output columns for the weighted sums). Two kernels:
//  * tiled (used when its shared memory fits): a block of 4 warps takes 16 query rows (4 per warp)
//    of one (batch·head, tangent) and stages each chunk of k, k1, k2, v, v1, v2 in shared memory once
//    for all 16 rows;
//  * rowwise (fallback, any D <= 256): one warp per query row reading the chunks from global memory.
// Per row each keeps the running max m, l = Σw, a1 = Σw s1, a2 = Σw s2, b = Σw s1²
// and three D-vectors A = Σw v, C1 = Σw (s1 v + v1), C2 = Σw ((s2 + s1²) v + 2 s1 v1 + v2), all
// rescaled by exp(m_old − m_new) when the max grows; the derivation is in
// fasthess/kernels/attention/online.py. No T×T tensor exists. Accumulates in T (float or double).
// A null tangent pointer is a zero tangent: the kernels are instantiated with SECOND = false when
// q2, k2, v2 are all null (no reads of them, no q2·k, q·k2, P·v2 products, fewer shared-memory
// stores); any other null tangent is read as 0 (no global read; its products still run, a
// warp-uniform pattern that is not worth more template instances).
#include "attention_jet2.h"

#include <math.h>
#include <stdlib.h>

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

// a tangent entry, 0 for an absent (null) tangent
template <typename T>
__device__ __forceinline__ T at_or_zero(const T* __restrict__ p, int64_t i) {
  return p != nullptr ? p[i] : T(0);
}

// DPL: output columns per lane (D <= 32 * DPL); SECOND: some of q2, k2, v2 is given
template <typename T, int DPL, bool SECOND>
__global__ void __launch_bounds__(kWarps * 32)
    attention_jet2_rowwise_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                          const T* __restrict__ q1, const T* __restrict__ k1, const T* __restrict__ v1,
                          const T* __restrict__ q2, const T* __restrict__ k2, const T* __restrict__ v2,
                          const uint8_t* __restrict__ keep, T* __restrict__ o, T* __restrict__ o1,
                          T* __restrict__ o2, int H, int BH, int TQ, int TK, int D, T scale, bool causal) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
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
    sq1[d] = at_or_zero(q1, qtoff + d);
    if (SECOND) sq2[d] = at_or_zero(q2, qtoff + d);
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
      const int64_t krow = ktb + (int64_t)j * D;  // the key's row in k1, k2
      for (int d = 0; d < D; ++d) {
        const T kd = kr[d], k1d = at_or_zero(k1, krow + d), qd = sq[d], q1d = sq1[d];
        s += qd * kd;
        s1 += q1d * kd + qd * k1d;
        s2 += T(2) * q1d * k1d;
        if (SECOND) s2 += sq2[d] * kd + qd * at_or_zero(k2, krow + d);
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
          const T vv = v[kb + r + d], vv1 = at_or_zero(v1, ktb + r + d);
          acc0[t] += wj * vv;
          acc1[t] += c1 * vv + wj * vv1;
          acc2[t] += c2 * vv + c3 * vv1;
          if (SECOND) acc2[t] += wj * at_or_zero(v2, ktb + r + d);
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

constexpr int kRowsPerWarp = 4;  // tiled kernel: query rows per warp
constexpr int kChunk = 32;       // keys per chunk (one per lane)

// Shared memory of the tiled kernel: k, k1, k2 chunks with rows padded to D + 1 (lane = key reads
// column d of its own row: the padding spreads the 32 lanes over the banks), v, v1, v2 chunks
// (lane = column), and the block's query rows q, q1, q2.
template <typename T>
size_t tiled_smem_bytes(int D) {
  return sizeof(T) * (3 * kChunk * (size_t)(D + 1) + 3 * kChunk * (size_t)D + kWarps * kRowsPerWarp * 3 * (size_t)D);
}

template <typename T, int DPL, bool SECOND>
__global__ void __launch_bounds__(kWarps * 32)
    attention_jet2_tiled_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                const T* __restrict__ q1, const T* __restrict__ k1, const T* __restrict__ v1,
                                const T* __restrict__ q2, const T* __restrict__ k2, const T* __restrict__ v2,
                                const uint8_t* __restrict__ keep, T* __restrict__ o, T* __restrict__ o1,
                                T* __restrict__ o2, int H, int BH, int TQ, int TK, int D, T scale, bool causal) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int DP = D + 1;
  T* ks = reinterpret_cast<T*>(smem_raw);  // [kChunk][DP]
  T* k1s = ks + kChunk * DP;
  T* k2s = k1s + kChunk * DP;
  T* vs = k2s + kChunk * DP;  // [kChunk][D]
  T* v1s = vs + kChunk * D;
  T* v2s = v1s + kChunk * D;
  T* qs = v2s + kChunk * D;  // [kWarps * kRowsPerWarp][3][D]: q, q1, q2 of each row

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t bh = blockIdx.y, n = blockIdx.z;
  const int rows = kWarps * kRowsPerWarp;
  const int row0 = blockIdx.x * rows;
  const int64_t kb = bh * TK * (int64_t)D;
  const int64_t ktb = (n * BH + bh) * TK * (int64_t)D;
  const uint8_t* kp = keep ? keep + (bh / H) * TK : nullptr;

  for (int idx = tid; idx < rows * D; idx += blockDim.x) {  // the block's query rows, 0 past TQ
    const int r = idx / D, d = idx - r * D, i = row0 + r;
    const bool in = i < TQ;
    const int64_t qo = (bh * TQ + i) * (int64_t)D + d, qt = ((n * BH + bh) * TQ + i) * (int64_t)D + d;
    qs[(r * 3 + 0) * D + d] = in ? q[qo] : T(0);
    qs[(r * 3 + 1) * D + d] = in ? at_or_zero(q1, qt) : T(0);
    if (SECOND) qs[(r * 3 + 2) * D + d] = in ? at_or_zero(q2, qt) : T(0);
  }

  const T neg_inf = -INFINITY;
  T m[kRowsPerWarp], l[kRowsPerWarp], a1[kRowsPerWarp], a2[kRowsPerWarp], bb[kRowsPerWarp];
  T acc0[kRowsPerWarp][DPL], acc1[kRowsPerWarp][DPL], acc2[kRowsPerWarp][DPL];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = neg_inf;
    l[r] = a1[r] = a2[r] = bb[r] = T(0);
#pragma unroll
    for (int t = 0; t < DPL; ++t) acc0[r][t] = acc1[r][t] = acc2[r][t] = T(0);
  }

  const int block_hi = causal ? min(TK, row0 + rows) : TK;  // keys any row of the block may see
  for (int j0 = 0; j0 < block_hi; j0 += kChunk) {
    __syncthreads();  // the previous chunk is consumed (and, the first time, qs is written)
    for (int idx = tid; idx < kChunk * D; idx += blockDim.x) {
      const int jj = idx / D, d = idx - jj * D, j = j0 + jj;
      const bool in = j < TK;
      const int64_t g = (int64_t)j * D + d;
      ks[jj * DP + d] = in ? k[kb + g] : T(0);
      k1s[jj * DP + d] = in ? at_or_zero(k1, ktb + g) : T(0);
      vs[jj * D + d] = in ? v[kb + g] : T(0);
      v1s[jj * D + d] = in ? at_or_zero(v1, ktb + g) : T(0);
      if (SECOND) {
        k2s[jj * DP + d] = in ? at_or_zero(k2, ktb + g) : T(0);
        v2s[jj * D + d] = in ? at_or_zero(v2, ktb + g) : T(0);
      }
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int rr = warp * kRowsPerWarp + r, i = row0 + rr;
      const int hi = causal ? min(TK, i + 1) : TK;
      if (i >= TQ || j0 >= hi) continue;  // warp-uniform: no key of this chunk is visible to row i
      const T* qr = qs + rr * 3 * D;
      const int j = j0 + lane;
      const bool vis = j < hi && (kp == nullptr || kp[j] != 0);
      T s = 0, s1 = 0, s2 = 0;
      if (vis) {
        const T* kr = ks + lane * DP;
        const T* k1r = k1s + lane * DP;
        const T* k2r = k2s + lane * DP;
        for (int d = 0; d < D; ++d) {
          const T kd = kr[d], k1d = k1r[d], qd = qr[d], q1d = qr[D + d];
          s += qd * kd;
          s1 += q1d * kd + qd * k1d;
          s2 += T(2) * q1d * k1d;
          if (SECOND) s2 += qr[2 * D + d] * kd + qd * k2r[d];
        }
        s *= scale;
        s1 *= scale;
        s2 *= scale;
      }
      const T m_new = fmax(m[r], warp_max(vis ? s : neg_inf));
      const T m_safe = m_new == neg_inf ? T(0) : m_new;
      const T alpha = exp(m[r] - m_safe);
      const T w = vis ? exp(s - m_safe) : T(0);
      const T ws1 = w * s1;
      l[r] = l[r] * alpha + warp_sum(w);
      a1[r] = a1[r] * alpha + warp_sum(ws1);
      a2[r] = a2[r] * alpha + warp_sum(w * s2);
      bb[r] = bb[r] * alpha + warp_sum(ws1 * s1);
#pragma unroll
      for (int t = 0; t < DPL; ++t) {
        acc0[r][t] *= alpha;
        acc1[r][t] *= alpha;
        acc2[r][t] *= alpha;
      }
      m[r] = m_new;
      const int cnt = min(kChunk, hi - j0);
      for (int jj = 0; jj < cnt; ++jj) {
        const T wj = __shfl_sync(0xffffffffu, w, jj);
        const T s1j = __shfl_sync(0xffffffffu, s1, jj);
        const T s2j = __shfl_sync(0xffffffffu, s2, jj);
        if (wj == T(0)) continue;
        const T c1 = wj * s1j, c2 = wj * (s2j + s1j * s1j), c3 = T(2) * wj * s1j;
#pragma unroll
        for (int t = 0; t < DPL; ++t) {
          const int d = lane + 32 * t;
          if (d < D) {
            const T vv = vs[jj * D + d], vv1 = v1s[jj * D + d];
            acc0[r][t] += wj * vv;
            acc1[r][t] += c1 * vv + wj * vv1;
            acc2[r][t] += c2 * vv + c3 * vv1;
            if (SECOND) acc2[r][t] += wj * v2s[jj * D + d];
          }
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int i = row0 + warp * kRowsPerWarp + r;
    if (i >= TQ) continue;
    const int64_t qoff = (bh * TQ + i) * (int64_t)D, qtoff = ((n * BH + bh) * TQ + i) * (int64_t)D;
    const T inv = l[r] > T(0) ? T(1) / l[r] : T(0);
    const T mu1 = a1[r] * inv, mu2 = a2[r] * inv, beta = bb[r] * inv;
    const T c = mu2 + beta - T(2) * mu1 * mu1;
#pragma unroll
    for (int t = 0; t < DPL; ++t) {
      const int d = lane + 32 * t;
      if (d < D) {
        const T ov = acc0[r][t] * inv, e1 = acc1[r][t] * inv;
        o1[qtoff + d] = e1 - mu1 * ov;
        o2[qtoff + d] = acc2[r][t] * inv - T(2) * mu1 * e1 - c * ov;
        if (n == 0) o[qoff + d] = ov;
      }
    }
  }
}

template <typename T, int DPL, bool SECOND>
cudaError_t launch_rowwise(const T* q, const T* k, const T* v, const T* q1, const T* k1, const T* v1, const T* q2,
                           const T* k2, const T* v2, const uint8_t* keep, T* o, T* o1, T* o2, int B, int H, int TQ,
                           int TK, int D, int N, T scale, bool causal, cudaStream_t stream) {
  const dim3 grid((TQ + kWarps - 1) / kWarps, B * H, N);
  const size_t smem = sizeof(T) * kWarps * 3 * D;
  attention_jet2_rowwise_kernel<T, DPL, SECOND><<<grid, kWarps * 32, smem, stream>>>(
      q, k, v, q1, k1, v1, q2, k2, v2, keep, o, o1, o2, H, B * H, TQ, TK, D, scale, causal);
  return cudaGetLastError();
}

// The tiled kernel when its shared memory fits the device's per-block opt-in limit, else the rowwise one.
template <typename T, int DPL, bool SECOND>
cudaError_t launch(const T* q, const T* k, const T* v, const T* q1, const T* k1, const T* v1, const T* q2,
                   const T* k2, const T* v2, const uint8_t* keep, T* o, T* o1, T* o2, int B, int H, int TQ, int TK,
                   int D, int N, T scale, bool causal, cudaStream_t stream) {
  int dev = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  const size_t smem = tiled_smem_bytes<T>(D);
  const char* force = getenv("FASTHESS_CUDA_ATTENTION_ROWWISE");  // "1": tests and memcheck of the fallback
  const bool rowwise = force != nullptr && force[0] == '1';
  if constexpr (DPL <= 4) {  // D <= 128: the 3 · 4 · DPL accumulators per lane stay in registers
    if (!rowwise && smem <= (size_t)optin) {
      err = cudaFuncSetAttribute(attention_jet2_tiled_kernel<T, DPL, SECOND>,
                                 cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
      if (err != cudaSuccess) return err;
      const int rows = kWarps * kRowsPerWarp;
      const dim3 grid((TQ + rows - 1) / rows, B * H, N);
      attention_jet2_tiled_kernel<T, DPL, SECOND><<<grid, kWarps * 32, smem, stream>>>(
          q, k, v, q1, k1, v1, q2, k2, v2, keep, o, o1, o2, H, B * H, TQ, TK, D, scale, causal);
      return cudaGetLastError();
    }
  }
  return launch_rowwise<T, DPL, SECOND>(q, k, v, q1, k1, v1, q2, k2, v2, keep, o, o1, o2, B, H, TQ, TK, D, N, scale,
                                        causal, stream);
}

template <typename T, bool SECOND>
cudaError_t launch_d(const T* q, const T* k, const T* v, const T* q1, const T* k1, const T* v1, const T* q2,
                     const T* k2, const T* v2, const uint8_t* keep, T* o, T* o1, T* o2, int B, int H, int TQ, int TK,
                     int D, int N, T scale, bool causal, cudaStream_t stream) {
#define FASTHESS_LAUNCH(DPL)                                                                                        \
  return launch<T, DPL, SECOND>(q, k, v, q1, k1, v1, q2, k2, v2, keep, o, o1, o2, B, H, TQ, TK, D, N, scale, causal, \
                                stream)
  if (D <= 32) FASTHESS_LAUNCH(1);
  if (D <= 64) FASTHESS_LAUNCH(2);
  if (D <= 128) FASTHESS_LAUNCH(4);
  FASTHESS_LAUNCH(8);
#undef FASTHESS_LAUNCH
}

}  // namespace

template <typename T>
cudaError_t attention_jet2(const T* q, const T* k, const T* v, const T* q1, const T* k1, const T* v1,
                           const T* q2, const T* k2, const T* v2, const uint8_t* keep, T* o, T* o1, T* o2,
                           int B, int H, int TQ, int TK, int D, int N, T scale, bool causal,
                           cudaStream_t stream) {
  if (B * H > 65535 || N > 65535 || D < 1 || D > 256 || TQ < 0 || TK < 0) return cudaErrorInvalidValue;
  if (TQ == 0 || N == 0 || B * H == 0) return cudaSuccess;
  if (q2 == nullptr && k2 == nullptr && v2 == nullptr)  // second-order tangents 0: compiled out
    return launch_d<T, false>(q, k, v, q1, k1, v1, q2, k2, v2, keep, o, o1, o2, B, H, TQ, TK, D, N, scale, causal,
                              stream);
  return launch_d<T, true>(q, k, v, q1, k1, v1, q2, k2, v2, keep, o, o1, o2, B, H, TQ, TK, D, N, scale, causal,
                           stream);
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
