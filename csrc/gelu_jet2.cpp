// 2-jet of GELU on the CPU. Spec: fasthess/kernels/gelu/reference.py.
//   y1 = g'(x) x1,  y2 = g'(x) x2 + g''(x) x1²  (elementwise, for N tangent pairs).
// erf form:  g' = Φ + x φ,  g'' = φ (2 - x²).
// tanh form: g = x/2 (1 + t), t = tanh(u), u = k (x + c x³):
//            g' = (1 + t)/2 + x/2 (1 - t²) u',  g'' = (1 - t²) (u' + x/2 (u'' - 2 t u'²)).
// g' and g'' of a block of x are computed once and shared by the N tangents.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <tuple>

namespace fasthess {
namespace {

constexpr int64_t kBlock = 1024;  // elements whose g', g'' stay on the stack while the tangents stream by

inline void gelu_derivatives(double x, bool tanh_form, double& g, double& d1, double& d2) {
  if (tanh_form) {
    constexpr double k = 0.7978845608028654;  // sqrt(2/pi)
    constexpr double c = 0.044715;
    const double t = std::tanh(k * (x + c * x * x * x));
    const double du = k * (1.0 + 3.0 * c * x * x), ddu = 6.0 * c * k * x, sech2 = 1.0 - t * t;
    g = 0.5 * x * (1.0 + t);
    d1 = 0.5 * (1.0 + t) + 0.5 * x * sech2 * du;
    d2 = sech2 * (du + 0.5 * x * (ddu - 2.0 * t * du * du));
  } else {
    const double phi = 0.3989422804014327 * std::exp(-0.5 * x * x);
    const double cdf = 0.5 * (1.0 + std::erf(x * 0.7071067811865476));
    g = x * cdf;
    d1 = cdf + x * phi;
    d2 = phi * (2.0 - x * x);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gelu_jet2_cpu(const at::Tensor& x, const at::Tensor& x1,
                                                             const at::Tensor& x2, c10::string_view approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh", "approximate must be 'none' or 'tanh', got '",
              std::string(approximate), "'");
  TORCH_CHECK(x1.dim() == x.dim() + 1 && x1.sizes().slice(1) == x.sizes() && x2.sizes() == x1.sizes(),
              "x1 and x2 must be (N, *x.shape)");
  TORCH_CHECK(x1.scalar_type() == x.scalar_type() && x2.scalar_type() == x.scalar_type(),
              "x, x1, x2 must share one dtype");
  const bool tanh_form = approximate == "tanh";
  const int64_t M = x.numel(), N = x1.size(0);
  auto xc = x.contiguous(), x1c = x1.contiguous(), x2c = x2.contiguous();
  auto y = at::empty_like(xc), y1 = at::empty_like(x1c), y2 = at::empty_like(x1c);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gelu_jet2_cpu", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* ap = x1c.data_ptr<scalar_t>();
    const scalar_t* bp = x2c.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* y1p = y1.data_ptr<scalar_t>();
    scalar_t* y2p = y2.data_ptr<scalar_t>();
    at::parallel_for(0, M, kBlock, [&](int64_t begin, int64_t end) {
      double d1[kBlock], d2[kBlock];
      for (int64_t lo = begin; lo < end; lo += kBlock) {
        const int64_t len = std::min(kBlock, end - lo);
        for (int64_t i = 0; i < len; ++i) {
          double g;
          gelu_derivatives(static_cast<double>(xp[lo + i]), tanh_form, g, d1[i], d2[i]);
          yp[lo + i] = static_cast<scalar_t>(g);
        }
        for (int64_t k = 0; k < N; ++k) {
          const int64_t off = k * M + lo;
          for (int64_t i = 0; i < len; ++i) {
            const double a = static_cast<double>(ap[off + i]);
            y1p[off + i] = static_cast<scalar_t>(d1[i] * a);
            y2p[off + i] = static_cast<scalar_t>(d1[i] * static_cast<double>(bp[off + i]) + d2[i] * a * a);
          }
        }
      }
    });
  });
  return {y, y1, y2};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fasthess, m) {
  m.def("gelu_jet2(Tensor x, Tensor x1, Tensor x2, str approximate) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fasthess, CPU, m) { m.impl("gelu_jet2", &gelu_jet2_cpu); }

}  // namespace fasthess
