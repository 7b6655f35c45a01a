// Attention HVP on the GPU: the attention backward (dq, dk, dv) and its tangents along N tangent sets
// (q1, k1, v1, dout1), FlashAttention-2 style (64 × 64 score tiles recomputed from the row statistics,
// no T × T tensor in memory). Formulas (fasthess/kernels/attention_hvp/blocked.py), with S = scale·q kᵀ:
//   P = softmax(S), dP = dO vᵀ, D = rowsum(P∘dP), dS = P∘(dP − D),
//   S1 = scale·(q1 kᵀ + q k1ᵀ), μ1 = rowsum(P∘S1), P1 = P∘(S1 − μ1), dP1 = dO1 vᵀ + dO v1ᵀ,
//   D1 = rowsum(P1∘dP + P∘dP1) = rowsum(P∘(S1∘(dP − D) + dP1))  (equal: both are rowsum(P∘S1∘dP) − μ1·D),
//   dS1 = P1∘(dP − D) + P∘(dP1 − D1),
//   dq = scale·dS k, dk = scale·dSᵀ q, dv = Pᵀ dO,
//   dq1 = scale·(dS1 k + dS k1), dk1 = scale·(dS1ᵀ q + dSᵀ q1), dv1 = P1ᵀ dO + Pᵀ dO1.
// Two kernels, deterministic (no atomics: every output element has one owning thread of one block):
//  * hvp_dq_kernel, one block per (batch·head, 64 query rows, tangent group): pass A sweeps the key tiles
//    for the primal row statistics (online softmax: lse and D); pass B recomputes P per key tile and
//    accumulates μ1 and D1 of each tangent of the group (exact sums, lse known); pass C recomputes the
//    tiles again and accumulates dq and dq1. The statistics go to the workspace for the second kernel.
//  * hvp_dkv_kernel, one block per (batch·head, 64 keys, tangent group): sweeps the query tiles (from the
//    block's first key on when causal), recomputes P, dS, P1, dS1 from the statistics and accumulates dk,
//    dv, dk1, dv1.
// The primal tiles (S, dP, P, dS) of a (query tile, key tile) pair are computed once per block and shared
// by the group's tangents; tangents are split into groups only when there are too few tiles to fill the
// GPU (each group recomputes the primal tiles; group 0 writes the primal outputs). 256 threads; a thread
// owns the 4 × 4 score entries (ty + 16a, tx + 16b) of a tile, a tile row lives in one half-warp. The head
// dim is streamed through shared memory in chunks of 32 (float) / 16 (double) columns, so D is unbounded;
// outputs are accumulated in place in global memory, chunk by chunk, by their owning thread (zeroed by the
// caller). Shared memory per block: float 65.5 KB (dq) / 81.8 KB (dkv), double 99 KB / 131.5 KB (opt-in
// above 48 KB; fits sm_80's 163 KB and sm_90's 227 KB). Accumulates in T (float or double).
#include "attention_hvp.h"

#include <math.h>

namespace fasthess_cuda {
namespace {

constexpr int kTile = 64;                // query rows and keys per tile
constexpr int kSide = 16;                // threads per tile side
constexpr int kThreads = kSide * kSide;  // 256
constexpr int kPer = kTile / kSide;      // 4 rows × 4 columns of scores per thread
constexpr int kLds = kTile + 1;          // row stride of the score tiles in shared memory (+1: no bank conflicts)

// Head-dim columns staged per step (DC), the row stride of a staged chunk (padded: the 16 rows a half-warp
// reads at one column fall in 16 different banks) and the size of the four staged operand chunks.
template <typename T>
struct Stage {
  static constexpr int DC = 32;
  static constexpr int LD = DC + 1;
  static constexpr int elems = 4 * kTile * LD;
};
template <>
struct Stage<double> {
  static constexpr int DC = 16;
  static constexpr int LD = DC + 1;
  static constexpr int elems = 4 * kTile * LD;
};

template <typename T>
struct Params {
  const T *q, *k, *v, *dout, *q1, *k1, *v1, *dout1;
  const uint8_t* keep;
  T *dq, *dk, *dv, *dq1, *dk1, *dv1;
  T* stats;  // (B·H, Tq, 2): lse, D; then (N, B·H, Tq, 2): μ1, D1
  int64_t H, BH, TQ, TK, D, N;
  int tiles, groups;  // tiles per head (grid.x = tiles · B·H), tangent groups (grid.y)
  T scale;
  bool causal;
};

template <typename T>
using Acc = T[kPer][kPer];

template <typename T>
__device__ __forceinline__ T row_sum(T x) {  // over the 16 threads of a tile row (a half-warp)
#pragma unroll
  for (int off = kSide / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

template <typename T>
__device__ __forceinline__ T row_max(T x) {
#pragma unroll
  for (int off = kSide / 2; off > 0; off >>= 1) x = fmax(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

// dst (kTile × stage_ld) <- rows [0, rows) and columns [d0, d0 + chunk) of src (row stride D); zeros elsewhere.
template <typename T>
__device__ __forceinline__ void stage_rows(T* dst, const T* src, int rows, int64_t D, int64_t d0) {
  constexpr int DC = Stage<T>::DC, LD = Stage<T>::LD;
  for (int idx = threadIdx.x; idx < kTile * DC; idx += kThreads) {
    const int r = idx / DC, c = idx - r * DC;
    const int64_t d = d0 + c;
    dst[r * LD + c] = (r < rows && d < D) ? src[r * D + d] : T(0);
  }
}

// Score products over the head dim, for the thread's entries (ty + 16a, tx + 16b):
// SUM: acc += A1 B1ᵀ + A2 B2ᵀ; else acc += A1 B1ᵀ and acc2 += A2 B2ᵀ. A1, A2: the tile's first query row
// (arows valid rows, row stride D); B1, B2: its first key row (brows valid rows). Each chunk starts with
// a barrier: once it returns, every thread has finished reading what the block read before the call (the
// kernels rely on it before overwriting their score tiles).
template <typename T, bool SUM>
__device__ void score_products(const T* A1, const T* B1, const T* A2, const T* B2, int arows, int brows, int64_t D,
                               T* stage, Acc<T>& acc, Acc<T>& acc2) {
  constexpr int DC = Stage<T>::DC, LD = Stage<T>::LD;
  const int ty = threadIdx.x / kSide, tx = threadIdx.x % kSide;
  T* sa1 = stage;
  T* sb1 = sa1 + kTile * LD;
  T* sa2 = sb1 + kTile * LD;
  T* sb2 = sa2 + kTile * LD;
  for (int64_t d0 = 0; d0 < D; d0 += DC) {
    __syncthreads();  // earlier readers of the staging buffers are done
    stage_rows(sa1, A1, arows, D, d0);
    stage_rows(sb1, B1, brows, D, d0);
    stage_rows(sa2, A2, arows, D, d0);
    stage_rows(sb2, B2, brows, D, d0);
    __syncthreads();
    for (int d = 0; d < DC; ++d) {  // columns past D are zeros
      T a1[kPer], a2[kPer], b1[kPer], b2[kPer];
#pragma unroll
      for (int t = 0; t < kPer; ++t) {
        a1[t] = sa1[(ty + kSide * t) * LD + d];
        a2[t] = sa2[(ty + kSide * t) * LD + d];
        b1[t] = sb1[(tx + kSide * t) * LD + d];
        b2[t] = sb2[(tx + kSide * t) * LD + d];
      }
#pragma unroll
      for (int a = 0; a < kPer; ++a)
#pragma unroll
        for (int b = 0; b < kPer; ++b) {
          acc[a][b] += a1[a] * b1[b];
          if (SUM)
            acc[a][b] += a2[a] * b2[b];
          else
            acc2[a][b] += a2[a] * b2[b];
        }
    }
  }
}

// Output products, accumulated into global memory: C[o][d] += Σ_x A1(o, x) B1[x][d] (+ Σ_x A2(o, x) B2[x][d]
// when TWO), with A(o, x) = TRANS ? A[x][o] : A[o][x] read from a score tile in shared memory (row stride
// kLds) and B1, B2 the first of xrows rows (row stride D) in global memory. C: the first of orows output rows
// (row stride D). Thread (ty, tx) owns C[ty + 16a][d0 + tx + 16j] of every chunk: one owner per element.
// Starts with a barrier (the score tiles written before the call are visible).
template <typename T, bool TRANS, bool TWO>
__device__ void output_products(const T* A1, const T* B1, const T* A2, const T* B2, int xrows, T* C, int orows,
                                int64_t D, T* stage) {
  constexpr int DC = Stage<T>::DC, LD = Stage<T>::LD, J = DC / kSide;
  const int ty = threadIdx.x / kSide, tx = threadIdx.x % kSide;
  T* sb1 = stage;
  T* sb2 = sb1 + kTile * LD;
  for (int64_t d0 = 0; d0 < D; d0 += DC) {
    __syncthreads();  // the score tiles are written; earlier readers of the staging buffers are done
    stage_rows(sb1, B1, xrows, D, d0);
    if (TWO) stage_rows(sb2, B2, xrows, D, d0);
    __syncthreads();
    T acc[kPer][J];
#pragma unroll
    for (int a = 0; a < kPer; ++a)
#pragma unroll
      for (int j = 0; j < J; ++j) acc[a][j] = T(0);
    for (int x = 0; x < xrows; ++x) {  // rows past xrows: zero scores
      T b1[J], b2[J];
#pragma unroll
      for (int j = 0; j < J; ++j) {
        b1[j] = sb1[x * LD + tx + kSide * j];
        b2[j] = TWO ? sb2[x * LD + tx + kSide * j] : T(0);
      }
#pragma unroll
      for (int a = 0; a < kPer; ++a) {
        const int o = ty + kSide * a;
        const T w1 = TRANS ? A1[x * kLds + o] : A1[o * kLds + x];
        const T w2 = TWO ? (TRANS ? A2[x * kLds + o] : A2[o * kLds + x]) : T(0);
#pragma unroll
        for (int j = 0; j < J; ++j) {
          acc[a][j] += w1 * b1[j];
          if (TWO) acc[a][j] += w2 * b2[j];
        }
      }
    }
#pragma unroll
    for (int a = 0; a < kPer; ++a) {
      const int o = ty + kSide * a;
#pragma unroll
      for (int j = 0; j < J; ++j) {
        const int64_t d = d0 + tx + kSide * j;
        if (o < orows && d < D) C[o * D + d] += acc[a][j];
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ bool visible(const Params<T>& p, const uint8_t* kp, int64_t i, int64_t j) {
  return i < p.TQ && j < p.TK && (!p.causal || j <= i) && (kp == nullptr || kp[j] != 0);
}

// One (query tile at i0, key tile at j0) pair of head bh: offsets of its first rows and their counts.
struct Pair {
  int64_t bh, i0, j0;
  int rows, cols;
};

template <typename T>
__device__ __forceinline__ int64_t q_at(const Params<T>& p, const Pair& t, int64_t n) {  // q-side offset, tangent n
  return ((n * p.BH + t.bh) * p.TQ + t.i0) * p.D;
}

template <typename T>
__device__ __forceinline__ int64_t k_at(const Params<T>& p, const Pair& t, int64_t n) {
  return ((n * p.BH + t.bh) * p.TK + t.j0) * p.D;
}

// The primal score tiles of a pair: s = S (scaled) on visible entries, -inf elsewhere; dp = dP.
template <typename T>
__device__ void score_tile(const Params<T>& p, const Pair& t, const uint8_t* kp, T* stage, Acc<T>& s, Acc<T>& dp) {
  const int ty = threadIdx.x / kSide, tx = threadIdx.x % kSide;
#pragma unroll
  for (int a = 0; a < kPer; ++a)
#pragma unroll
    for (int b = 0; b < kPer; ++b) s[a][b] = dp[a][b] = T(0);
  const int64_t qo = q_at(p, t, 0), ko = k_at(p, t, 0);
  score_products<T, false>(p.q + qo, p.k + ko, p.dout + qo, p.v + ko, t.rows, t.cols, p.D, stage, s, dp);
#pragma unroll
  for (int a = 0; a < kPer; ++a)
#pragma unroll
    for (int b = 0; b < kPer; ++b)
      s[a][b] = visible(p, kp, t.i0 + ty + kSide * a, t.j0 + tx + kSide * b) ? s[a][b] * p.scale : T(-INFINITY);
}

// In place: s -> P = exp(S − lse) (0 where masked: exp(-inf)), dp -> dP − D, with the row statistics of the
// thread's rows (a row that sees no key has lse = +inf and only masked entries).
template <typename T>
__device__ __forceinline__ void probabilities(const T (&lse)[kPer], const T (&dd)[kPer], Acc<T>& s, Acc<T>& dp) {
#pragma unroll
  for (int a = 0; a < kPer; ++a)
#pragma unroll
    for (int b = 0; b < kPer; ++b) {
      s[a][b] = exp(s[a][b] - lse[a]);
      dp[a][b] -= dd[a];
    }
}

// Tangent n's score tiles of a pair: s1 = S1 (scaled), dp1 = dP1.
template <typename T>
__device__ void tangent_tile(const Params<T>& p, const Pair& t, int64_t n, T* stage, Acc<T>& s1, Acc<T>& dp1) {
  const int64_t qo = q_at(p, t, 0), ko = k_at(p, t, 0), qn = q_at(p, t, n), kn = k_at(p, t, n);
#pragma unroll 1
  for (int which = 0; which < 2; ++which) {  // S1, then dP1 (one call site: compile time)
    const bool s = which == 0;
    Acc<T> acc;
#pragma unroll
    for (int a = 0; a < kPer; ++a)
#pragma unroll
      for (int b = 0; b < kPer; ++b) acc[a][b] = T(0);
    score_products<T, true>(s ? p.q1 + qn : p.dout1 + qn, s ? p.k + ko : p.v + ko, s ? p.q + qo : p.dout + qo,
                            s ? p.k1 + kn : p.v1 + kn, t.rows, t.cols, p.D, stage, acc, acc);
#pragma unroll
    for (int a = 0; a < kPer; ++a)
#pragma unroll
      for (int b = 0; b < kPer; ++b) {
        if (s)
          s1[a][b] = acc[a][b] * p.scale;
        else
          dp1[a][b] = acc[a][b];
      }
  }
}

template <typename T>
__device__ __forceinline__ T* tangent_stats(const Params<T>& p, int64_t n, int64_t bh, int64_t i) {
  return p.stats + 2 * (p.BH * p.TQ + (n * p.BH + bh) * p.TQ + i);
}

// Three sweeps over the key tiles of the block's query rows, one call site per helper (compile time):
// pass 0: lse and D (online softmax: running max m, l = Σw, Σw·dP with w = exp(S − m));
// pass 1: μ1 = rowsum(P∘S1) and D1 = rowsum(P∘(S1∘(dP − D) + dP1)) of each tangent of the group, summed over
//         the key tiles in the workspace by the thread tx = 0 of each row (the only one touching them until
//         the barrier before pass 2);
// pass 2: dq (group 0) and dq1 of the group's tangents.
template <typename T>
__global__ void __launch_bounds__(kThreads) hvp_dq_kernel(Params<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* stage = reinterpret_cast<T*>(smem_raw);
  T* ds_s = stage + Stage<T>::elems;  // scale·dS of the current pair
  T* ds1_s = ds_s + kTile * kLds;     // scale·dS1 of the current pair and tangent
  const int ty = threadIdx.x / kSide, tx = threadIdx.x % kSide;
  Pair t;
  t.bh = blockIdx.x / p.tiles;
  t.i0 = (int64_t)(blockIdx.x % p.tiles) * kTile;
  t.rows = (int)min((int64_t)kTile, p.TQ - t.i0);
  const int g = blockIdx.y;
  const int64_t n0 = g * p.N / p.groups, n1 = (g + 1) * p.N / p.groups;  // the group's tangents
  const int64_t hi = p.causal ? min(p.TK, t.i0 + kTile) : p.TK;         // later keys are masked for every row
  const uint8_t* kp = p.keep ? p.keep + (t.bh / p.H) * p.TK : nullptr;
  const int64_t qo = q_at(p, t, 0);
  const T neg_inf = -INFINITY;
  T m[kPer], l[kPer], adp[kPer], lse[kPer], dd[kPer];
#pragma unroll
  for (int a = 0; a < kPer; ++a) {
    m[a] = neg_inf;
    l[a] = adp[a] = T(0);
  }
  for (int pass = 0; pass < 3; ++pass) {
    if (pass == 1) {
#pragma unroll
      for (int a = 0; a < kPer; ++a) {
        const bool has = l[a] > T(0);  // a row that sees no key: P = 0 (lse = +inf), D = 0
        lse[a] = has ? m[a] + log(l[a]) : T(INFINITY);
        dd[a] = has ? adp[a] / l[a] : T(0);
        const int64_t i = t.i0 + ty + kSide * a;
        if (tx == 0 && i < p.TQ) {
          if (g == 0) {
            T* st = p.stats + 2 * (t.bh * p.TQ + i);
            st[0] = lse[a];
            st[1] = dd[a];
          }
          for (int64_t n = n0; n < n1; ++n) {
            T* st = tangent_stats(p, n, t.bh, i);
            st[0] = st[1] = T(0);
          }
        }
      }
      if (n1 == n0) continue;  // no tangents: no tangent statistics
    }
    if (pass == 2) __syncthreads();  // the tangent statistics are complete (read by every thread of the row)
    for (t.j0 = 0; t.j0 < hi; t.j0 += kTile) {
      t.cols = (int)min((int64_t)kTile, p.TK - t.j0);
      Acc<T> P, dpc;  // S and dP first
      score_tile(p, t, kp, stage, P, dpc);
      if (pass == 0) {
#pragma unroll
        for (int a = 0; a < kPer; ++a) {
          T mx = neg_inf;
#pragma unroll
          for (int b = 0; b < kPer; ++b) mx = fmax(mx, P[a][b]);
          const T m_new = fmax(m[a], row_max(mx));
          const T m_safe = m_new == neg_inf ? T(0) : m_new;  // nothing visible yet
          const T alpha = exp(m[a] - m_safe);                 // 0 while m is -inf
          T ws = 0, wdp = 0;
#pragma unroll
          for (int b = 0; b < kPer; ++b) {
            const T w = exp(P[a][b] - m_safe);  // 0 on masked entries
            ws += w;
            wdp += w * dpc[a][b];
          }
          l[a] = l[a] * alpha + row_sum(ws);
          adp[a] = adp[a] * alpha + row_sum(wdp);
          m[a] = m_new;
        }
        continue;
      }
      probabilities(lse, dd, P, dpc);
      const int64_t ko = k_at(p, t, 0);
      if (pass == 2) {  // score_tile's barriers: the last pair's readers of ds_s are done
#pragma unroll
        for (int a = 0; a < kPer; ++a)
#pragma unroll
          for (int b = 0; b < kPer; ++b)
            ds_s[(ty + kSide * a) * kLds + tx + kSide * b] = p.scale * P[a][b] * dpc[a][b];
        if (g == 0)
          output_products<T, false, false>(ds_s, p.k + ko, nullptr, nullptr, t.cols, p.dq + qo, t.rows, p.D, stage);
      }
      for (int64_t n = n0; n < n1; ++n) {
        Acc<T> s1, dp1;
        tangent_tile(p, t, n, stage, s1, dp1);  // its barriers: the last tangent's readers of ds1_s are done
#pragma unroll
        for (int a = 0; a < kPer; ++a) {
          const int64_t i = t.i0 + ty + kSide * a;
          T* st = tangent_stats(p, n, t.bh, i < p.TQ ? i : t.i0);  // a row past Tq: P = 0, any finite μ1, D1
          if (pass == 1) {
            T mu = 0, d1 = 0;
#pragma unroll
            for (int b = 0; b < kPer; ++b) {
              mu += P[a][b] * s1[a][b];
              d1 += P[a][b] * (s1[a][b] * dpc[a][b] + dp1[a][b]);
            }
            mu = row_sum(mu);
            d1 = row_sum(d1);
            if (tx == 0 && i < p.TQ) {
              st[0] += mu;
              st[1] += d1;
            }
          } else {
            const T mu1 = st[0], d1 = st[1];
#pragma unroll
            for (int b = 0; b < kPer; ++b) {
              const T p1 = P[a][b] * (s1[a][b] - mu1);
              ds1_s[(ty + kSide * a) * kLds + tx + kSide * b] =
                  p.scale * (p1 * dpc[a][b] + P[a][b] * (dp1[a][b] - d1));
            }
          }
        }
        if (pass == 2)
          output_products<T, false, true>(ds1_s, p.k + ko, ds_s, p.k1 + k_at(p, t, n), t.cols,
                                          p.dq1 + q_at(p, t, n), t.rows, p.D, stage);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) hvp_dkv_kernel(Params<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* stage = reinterpret_cast<T*>(smem_raw);
  T* p_s = stage + Stage<T>::elems;  // P of the current pair
  T* ds_s = p_s + kTile * kLds;       // scale·dS
  T* x_s = ds_s + kTile * kLds;       // P1, then scale·dS1, of the current tangent
  const int ty = threadIdx.x / kSide, tx = threadIdx.x % kSide;
  Pair t;
  t.bh = blockIdx.x / p.tiles;
  t.j0 = (int64_t)(blockIdx.x % p.tiles) * kTile;
  t.cols = (int)min((int64_t)kTile, p.TK - t.j0);
  const int g = blockIdx.y;
  const int64_t n0 = g * p.N / p.groups, n1 = (g + 1) * p.N / p.groups;
  const uint8_t* kp = p.keep ? p.keep + (t.bh / p.H) * p.TK : nullptr;
  const int64_t ko = k_at(p, t, 0);
  // causal: queries before the block's first key see none of its keys
  for (t.i0 = p.causal ? t.j0 : 0; t.i0 < p.TQ; t.i0 += kTile) {
    t.rows = (int)min((int64_t)kTile, p.TQ - t.i0);
    T lse[kPer], dd[kPer];
#pragma unroll
    for (int a = 0; a < kPer; ++a) {
      const int64_t i = t.i0 + ty + kSide * a;
      const T* st = p.stats + 2 * (t.bh * p.TQ + (i < p.TQ ? i : t.i0));
      lse[a] = st[0];
      dd[a] = st[1];
    }
    Acc<T> P, dpc;
    score_tile(p, t, kp, stage, P, dpc);  // its barriers: the last pair's readers of p_s, ds_s are done
    probabilities(lse, dd, P, dpc);
#pragma unroll
    for (int a = 0; a < kPer; ++a)
#pragma unroll
      for (int b = 0; b < kPer; ++b) {
        const int e = (ty + kSide * a) * kLds + tx + kSide * b;
        p_s[e] = P[a][b];
        ds_s[e] = p.scale * P[a][b] * dpc[a][b];
      }
    const int64_t qo = q_at(p, t, 0);
    if (g == 0) {
      output_products<T, true, false>(p_s, p.dout + qo, nullptr, nullptr, t.rows, p.dv + ko, t.cols, p.D, stage);
      output_products<T, true, false>(ds_s, p.q + qo, nullptr, nullptr, t.rows, p.dk + ko, t.cols, p.D, stage);
    }
    for (int64_t n = n0; n < n1; ++n) {
      Acc<T> s1, dp1;
      tangent_tile(p, t, n, stage, s1, dp1);  // its barriers: the last tangent's readers of x_s are done
      Acc<T> ds1;
#pragma unroll
      for (int a = 0; a < kPer; ++a) {
        const int64_t i = t.i0 + ty + kSide * a;
        const T* st = tangent_stats(p, n, t.bh, i < p.TQ ? i : t.i0);
        const T mu1 = st[0], d1 = st[1];
#pragma unroll
        for (int b = 0; b < kPer; ++b) {
          const T p1 = P[a][b] * (s1[a][b] - mu1);
          x_s[(ty + kSide * a) * kLds + tx + kSide * b] = p1;
          ds1[a][b] = p.scale * (p1 * dpc[a][b] + P[a][b] * (dp1[a][b] - d1));
        }
      }
      const int64_t qn = q_at(p, t, n), kn = k_at(p, t, n);
      output_products<T, true, true>(x_s, p.dout + qo, p_s, p.dout1 + qn, t.rows, p.dv1 + kn, t.cols, p.D, stage);
      __syncthreads();  // every thread has read P1 from x_s
#pragma unroll
      for (int a = 0; a < kPer; ++a)
#pragma unroll
        for (int b = 0; b < kPer; ++b) x_s[(ty + kSide * a) * kLds + tx + kSide * b] = ds1[a][b];
      output_products<T, true, true>(x_s, p.q + qo, ds_s, p.q1 + qn, t.rows, p.dk1 + kn, t.cols, p.D, stage);
    }
  }
}

// Tangent groups for a grid of `blocks` blocks per group: enough blocks for two per SM, at most one group per tangent.
int tangent_groups(int64_t blocks, int N, int sms) {
  const int64_t want = (2 * (int64_t)sms + blocks - 1) / blocks;
  const int64_t most = N > 0 ? N : 1;
  return (int)(want < 1 ? 1 : (want > most ? most : (want > 65535 ? 65535 : want)));
}

}  // namespace

template <typename T>
cudaError_t attention_hvp(const T* q, const T* k, const T* v, const T* dout, const T* q1, const T* k1, const T* v1,
                          const T* dout1, const uint8_t* keep, T* dq, T* dk, T* dv, T* dq1, T* dk1, T* dv1,
                          T* workspace, int B, int H, int TQ, int TK, int D, int N, T scale, bool causal,
                          cudaStream_t stream) {
  if (B < 0 || H < 0 || TQ < 0 || TK < 0 || D < 1 || N < 0) return cudaErrorInvalidValue;
  if (B == 0 || H == 0 || TQ == 0 || TK == 0) return cudaSuccess;  // outputs stay zero
  int dev = 0, sms = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  const size_t smem_dq = sizeof(T) * ((size_t)Stage<T>::elems + 2 * (size_t)kTile * kLds);
  const size_t smem_dkv = sizeof(T) * ((size_t)Stage<T>::elems + 3 * (size_t)kTile * kLds);
  if (smem_dkv > (size_t)optin) return cudaErrorInvalidConfiguration;  // before sm_80
  err = cudaFuncSetAttribute(hvp_dq_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_dq);
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(hvp_dkv_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_dkv);
  if (err != cudaSuccess) return err;

  Params<T> p{q, k, v, dout, q1, k1, v1, dout1, keep, dq, dk, dv, dq1, dk1, dv1, workspace,
              H, (int64_t)B * H, TQ, TK, D, N, 0, 1, scale, causal};
  void* args[] = {&p};
  p.tiles = (TQ + kTile - 1) / kTile;
  p.groups = tangent_groups((int64_t)p.tiles * p.BH, N, sms);
  err = cudaLaunchKernel(hvp_dq_kernel<T>, dim3((unsigned)(p.tiles * p.BH), p.groups), dim3(kThreads), args,
                         smem_dq, stream);
  if (err != cudaSuccess) return err;
  p.tiles = (TK + kTile - 1) / kTile;  // the second kernel reads the statistics the first wrote (same stream)
  p.groups = tangent_groups((int64_t)p.tiles * p.BH, N, sms);
  return cudaLaunchKernel(hvp_dkv_kernel<T>, dim3((unsigned)(p.tiles * p.BH), p.groups), dim3(kThreads), args,
                          smem_dkv, stream);
}

template cudaError_t attention_hvp<float>(const float*, const float*, const float*, const float*, const float*,
                                          const float*, const float*, const float*, const uint8_t*, float*, float*,
                                          float*, float*, float*, float*, float*, int, int, int, int, int, int,
                                          float, bool, cudaStream_t);
template cudaError_t attention_hvp<double>(const double*, const double*, const double*, const double*,
                                           const double*, const double*, const double*, const double*,
                                           const uint8_t*, double*, double*, double*, double*, double*, double*,
                                           double*, int, int, int, int, int, int, double, bool, cudaStream_t);

}  // namespace fasthess_cuda
