// GELU 2-jet on the GPU: y = g(x), y1 = g'(x) x1, y2 = g'(x) x2 + g''(x) x1² for N tangent pairs.
// Each thread takes elements i (grid-stride loop), computes g, g', g'' of x[i] once and streams the
// N tangent pairs of that element (coalesced across the warp for every n). Formulas as in
// csrc/gelu_jet2.cpp and the Triton kernel:
//   erf form:  Φ = erfc(-x/√2)/2 (no cancellation for x << 0), φ = exp(-x²/2)/√(2π),
//              g = x Φ, g' = Φ + x φ, g'' = φ (2 - x²);
//   tanh form: u = k (x + c x³), t = tanh(u) through e = exp(-2|u|) (no overflow; 1 + t, 1 - t²
//              without cancellation), g = x (1 + t)/2, g' = (1 + t)/2 + x/2 (1 - t²) u',
//              g'' = (1 - t²) (u' + x/2 (u'' - 2 t u'²)).
#include "gelu_jet2.h"

namespace fasthess_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;  // grid-stride beyond this

__device__ __forceinline__ float exp_(float v) { return expf(v); }
__device__ __forceinline__ double exp_(double v) { return exp(v); }
__device__ __forceinline__ float erfc_(float v) { return erfcf(v); }
__device__ __forceinline__ double erfc_(double v) { return erfc(v); }

template <typename T, bool TANH>
__global__ void __launch_bounds__(kThreads)
    gelu_jet2_kernel(const T* __restrict__ x, const T* __restrict__ x1, const T* __restrict__ x2, T* __restrict__ y,
                     T* __restrict__ y1, T* __restrict__ y2, int64_t M, int64_t N) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < M; i += stride) {
    const T v = x[i];
    T g, d1, d2;
    if constexpr (TANH) {
      const T k = T(0.7978845608028654), c = T(0.044715);  // sqrt(2/pi)
      const T u = k * (v + c * v * v * v), du = k * (T(1) + T(3) * c * v * v);
      const T e = exp_(T(-2) * fabs(u)), inv = T(1) / (T(1) + e);
      const T t = u >= T(0) ? T(1) - T(2) * e * inv : T(2) * e * inv - T(1);
      const T one_plus_t = u >= T(0) ? T(2) * inv : T(2) * e * inv;
      const T sech2 = T(4) * e * inv * inv;
      g = T(0.5) * v * one_plus_t;
      d1 = T(0.5) * one_plus_t + T(0.5) * v * sech2 * du;
      d2 = sech2 * (du + T(0.5) * v * (T(6) * c * k * v - T(2) * t * du * du));
    } else {
      const T phi = T(0.3989422804014327) * exp_(T(-0.5) * v * v);  // 1/sqrt(2 pi)
      const T cdf = T(0.5) * erfc_(T(-0.7071067811865476) * v);
      g = v * cdf;
      d1 = cdf + v * phi;
      d2 = phi * (T(2) - v * v);
    }
    y[i] = g;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t j = n * M + i;
      const T a = x1[j];
      y1[j] = d1 * a;
      y2[j] = d1 * x2[j] + d2 * a * a;
    }
  }
}

}  // namespace

template <typename T>
cudaError_t gelu_jet2(const T* x, const T* x1, const T* x2, T* y, T* y1, T* y2, int64_t M, int64_t N, bool tanh_form,
                      cudaStream_t stream) {
  if (M < 0 || N < 0) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  const int64_t need = (M + kThreads - 1) / kThreads;
  const unsigned blocks = (unsigned)(need < kMaxBlocks ? need : kMaxBlocks);
  if (tanh_form)
    gelu_jet2_kernel<T, true><<<blocks, kThreads, 0, stream>>>(x, x1, x2, y, y1, y2, M, N);
  else
    gelu_jet2_kernel<T, false><<<blocks, kThreads, 0, stream>>>(x, x1, x2, y, y1, y2, M, N);
  return cudaGetLastError();
}

template cudaError_t gelu_jet2<float>(const float*, const float*, const float*, float*, float*, float*, int64_t,
                                      int64_t, bool, cudaStream_t);
template cudaError_t gelu_jet2<double>(const double*, const double*, const double*, double*, double*, double*,
                                       int64_t, int64_t, bool, cudaStream_t);

}  // namespace fasthess_cuda
