// Cross-entropy 2-jet on the GPU, per row; math as in csrc/loss_ops.cpp. With p = softmax(z), target t and the
// target-shifted tangents d = z1 - z1_t, w = z2 - z2_t (an exact shift: Σ p = 1):
//   loss = log Σ exp z - z_t,   l1 = E_p[d] = Σ p z1 - z1_t,   l2 = E_p[w] + E_p[d²] - E_p[d]²,
// the shift sparing the cancellation of Σ p z1 against z1_t (and of E[d²] against E[d]² when z1 is near
// constant over the row). One block per (row, chunk of KC tangents): each thread streams a strided part of
// the row with an online softmax (its running max m, s = Σ exp(z - m) and per tangent Σ e d, Σ e d², Σ e w,
// rescaled by exp(m_old - m_new) when m grows), so any V fits in registers; the threads' states are merged in
// a fixed order (warp shuffles, then warp 0's lane 0 over the warps): deterministic. Accumulates in T.
#include "cross_entropy_jet2.h"

#include <math.h>

namespace fasthess_cuda {
namespace {

constexpr int kMaxThreads = 512;

template <typename T, int KC>
struct OnlineState {
  T m, s, a1[KC], a2[KC], a3[KC];  // running max, Σ e, Σ e d, Σ e d², Σ e w with e = exp(z - m)
};

// x ← x ⊕ o: both rescaled to the larger max (a state that saw nothing has m = -inf and zero sums).
template <typename T, int KC>
__device__ __forceinline__ void merge(OnlineState<T, KC>& x, const OnlineState<T, KC>& o) {
  const T mx = x.m > o.m ? x.m : o.m;
  if (mx == -INFINITY) return;
  const T fx = exp(x.m - mx), fo = exp(o.m - mx);
  x.s = x.s * fx + o.s * fo;
#pragma unroll
  for (int i = 0; i < KC; ++i) {
    x.a1[i] = x.a1[i] * fx + o.a1[i] * fo;
    x.a2[i] = x.a2[i] * fx + o.a2[i] * fo;
    x.a3[i] = x.a3[i] * fx + o.a3[i] * fo;
  }
  x.m = mx;
}

template <typename T, int KC>
__device__ __forceinline__ OnlineState<T, KC> shfl_down(const OnlineState<T, KC>& x, int off) {
  OnlineState<T, KC> o;
  o.m = __shfl_down_sync(0xffffffffu, x.m, off);
  o.s = __shfl_down_sync(0xffffffffu, x.s, off);
#pragma unroll
  for (int i = 0; i < KC; ++i) {
    o.a1[i] = __shfl_down_sync(0xffffffffu, x.a1[i], off);
    o.a2[i] = __shfl_down_sync(0xffffffffu, x.a2[i], off);
    o.a3[i] = __shfl_down_sync(0xffffffffu, x.a3[i], off);
  }
  return o;
}

template <typename T, int KC, bool HAS_Z2>
__global__ void __launch_bounds__(kMaxThreads)
    cross_entropy_jet2_kernel(const T* __restrict__ z, const int64_t* __restrict__ y, const T* __restrict__ z1,
                              const T* __restrict__ z2, T* __restrict__ rows0, T* __restrict__ rows1,
                              T* __restrict__ rows2, int64_t N, int64_t V, int64_t K, int64_t ignore_index) {
  __shared__ OnlineState<T, KC> warp_states[kMaxThreads / 32];
  const int64_t row = blockIdx.x, k0 = (int64_t)blockIdx.y * KC;
  const int kc = K - k0 < KC ? (int)(K - k0) : KC;  // tangents of this block (0 when K = 0)
  const int64_t t = y[row];
  if (t == ignore_index || t < 0 || t >= V) {  // uniform over the block: no barrier is skipped by some threads
    if (threadIdx.x == 0) {
      const T val = t == ignore_index ? T(0) : T(NAN);
      if (blockIdx.y == 0) rows0[row] = val;
      for (int i = 0; i < kc; ++i) rows1[(k0 + i) * N + row] = rows2[(k0 + i) * N + row] = val;
    }
    return;
  }
  const T* zr = z + row * V;
  int64_t off[KC];
  T d_t[KC], w_t[KC];
  OnlineState<T, KC> st;
  st.m = -INFINITY;
  st.s = 0;
#pragma unroll
  for (int i = 0; i < KC; ++i) {
    off[i] = ((k0 + (i < kc ? i : 0)) * N + row) * V;  // a tangent past K reads tangent k0's row, unused
    d_t[i] = i < kc ? z1[off[i] + t] : T(0);
    w_t[i] = HAS_Z2 && i < kc ? z2[off[i] + t] : T(0);
    st.a1[i] = st.a2[i] = st.a3[i] = 0;
  }
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    const T x = zr[v];
    if (x > st.m) {  // rescale to the new max (the first time: everything is still 0)
      const T f = exp(st.m - x);
      st.s *= f;
#pragma unroll
      for (int i = 0; i < KC; ++i) {
        st.a1[i] *= f;
        st.a2[i] *= f;
        st.a3[i] *= f;
      }
      st.m = x;
    }
    const T e = exp(x - st.m);
    st.s += e;
#pragma unroll
    for (int i = 0; i < KC; ++i) {
      if (i < kc) {
        const T d = z1[off[i] + v] - d_t[i], ed = e * d;
        st.a1[i] += ed;
        st.a2[i] += ed * d;
        if (HAS_Z2) st.a3[i] += e * (z2[off[i] + v] - w_t[i]);
      }
    }
  }
  // block merge in a fixed order: warp tree (lane 0 holds the warp's state), then warp 0's lane 0 over the warps
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const OnlineState<T, KC> other = shfl_down(st, o);
    merge(st, other);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) warp_states[warp] = st;
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < (int)(blockDim.x >> 5); ++w) merge(st, warp_states[w]);
  const T inv = T(1) / st.s;
  if (blockIdx.y == 0) rows0[row] = st.m + log(st.s) - zr[t];
#pragma unroll
  for (int i = 0; i < KC; ++i) {
    if (i < kc) {
      const T mean_d = st.a1[i] * inv;
      rows1[(k0 + i) * N + row] = mean_d;
      rows2[(k0 + i) * N + row] = st.a2[i] * inv - mean_d * mean_d + (HAS_Z2 ? st.a3[i] * inv : T(0));
    }
  }
}

template <typename T, int KC>
cudaError_t launch(const T* z, const int64_t* y, const T* z1, const T* z2, T* rows0, T* rows1, T* rows2, int64_t N,
                   int64_t V, int64_t K, int64_t ignore_index, cudaStream_t stream) {
  const int64_t chunks = K > 0 ? (K + KC - 1) / KC : 1;  // K = 0: one block per row for the loss
  if (N > 0x7fffffff || chunks > 65535) return cudaErrorInvalidValue;
  // about 4 columns per thread on short rows, 512 threads from V > 4096 on
  const int threads = V <= 256 ? 64 : V <= 1024 ? 128 : V <= 4096 ? 256 : kMaxThreads;
  const dim3 grid((unsigned)N, (unsigned)chunks);
  if (z2 != nullptr)
    cross_entropy_jet2_kernel<T, KC, true><<<grid, threads, 0, stream>>>(z, y, z1, z2, rows0, rows1, rows2, N, V, K,
                                                                         ignore_index);
  else
    cross_entropy_jet2_kernel<T, KC, false><<<grid, threads, 0, stream>>>(z, y, z1, z2, rows0, rows1, rows2, N, V,
                                                                          K, ignore_index);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t cross_entropy_jet2_rows(const T* z, const int64_t* y, const T* z1, const T* z2, T* rows0, T* rows1,
                                    T* rows2, int64_t N, int64_t V, int64_t K, int64_t ignore_index,
                                    cudaStream_t stream) {
  if (N < 0 || V < 1 || K < 0) return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  // up to 4 tangents per block (the row's softmax shared by them), fewer while that would leave under two
  // blocks per multiprocessor (a few long rows: more blocks, each re-reading the row's logits)
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  int kc = K >= 3 ? 4 : K == 2 ? 2 : 1;
  while (kc > 1 && N * ((K + kc - 1) / kc) < 2 * (int64_t)sms) kc /= 2;
  if (kc == 4) return launch<T, 4>(z, y, z1, z2, rows0, rows1, rows2, N, V, K, ignore_index, stream);
  if (kc == 2) return launch<T, 2>(z, y, z1, z2, rows0, rows1, rows2, N, V, K, ignore_index, stream);
  return launch<T, 1>(z, y, z1, z2, rows0, rows1, rows2, N, V, K, ignore_index, stream);
}

template cudaError_t cross_entropy_jet2_rows<float>(const float*, const int64_t*, const float*, const float*, float*,
                                                    float*, float*, int64_t, int64_t, int64_t, int64_t,
                                                    cudaStream_t);
template cudaError_t cross_entropy_jet2_rows<double>(const double*, const int64_t*, const double*, const double*,
                                                     double*, double*, double*, int64_t, int64_t, int64_t, int64_t,
                                                     cudaStream_t);

}  // namespace fasthess_cuda
