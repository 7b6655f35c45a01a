// 2-jet of GELU on the CPU. Spec: fasthess/kernels/gelu/reference.py.
//   y1 = g'(x) x1,  y2 = g'(x) x2 + g''(x) x1²  (elementwise, for N tangent pairs).
// erf form:  g' = Φ + x φ,  g'' = φ (2 - x²).
// tanh form: g = x/2 (1 + t), t = tanh(u), u = k (x + c x³):
//            g' = (1 + t)/2 + x/2 (1 - t²) u',  g'' = (1 - t²) (u' + x/2 (u'' - 2 t u'²)).
// g' and g'' are computed once (ATen's vectorised exp/erf) and shared by the N tangents.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include "parallel.h"
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "jet2_checks.h"

namespace fasthess {
namespace {

constexpr int64_t kBlock = 4096;  // elements whose g', g'' stay in L1/L2 while the N tangents stream by

// g, g', g'' of the primal, with ATen's vectorised exp/erf/tanh (computed once, shared by the N tangents).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gelu_derivatives(const at::Tensor& x, bool tanh_form) {
  if (tanh_form) {
    const double k = 0.7978845608028654, c = 0.044715;  // sqrt(2/pi)
    auto u = (x + c * x * x * x) * k;
    // 1 + t = 2σ(2u), 1 - t² = 4σ(2u)σ(-2u): no cancellation where t = tanh(u) is near ±1
    auto s = at::sigmoid(2 * u), s_neg = at::sigmoid(-2 * u);
    auto t = s - s_neg, du = (1 + 3 * c * x * x) * k, sech2 = 4 * s * s_neg;
    return {x * s, s + 0.5 * x * sech2 * du, sech2 * (du + 0.5 * x * (6 * c * k * x - 2 * t * du * du))};
  }
  auto phi = at::exp(-0.5 * x * x) * 0.3989422804014327;
  auto cdf = 0.5 * (1 + at::erf(x * 0.7071067811865476));
  return {x * cdf, cdf + x * phi, phi * (2 - x * x)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gelu_jet2_cpu(const at::Tensor& x, const at::Tensor& x1,
                                                             const at::Tensor& x2, c10::string_view approximate) {
  check_gelu_jet2_inputs(x, x1, x2, approximate);
  const int64_t M = x.numel(), N = x1.size(0);
  // half/bfloat16: derivatives and products in float
  const auto math_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto [g, d1, d2] = gelu_derivatives(x.to(math_type).contiguous(), approximate == "tanh");
  auto x1c = x1.contiguous(), x2c = x2.contiguous();
  auto y1 = at::empty_like(x1c), y2 = at::empty_like(x1c);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gelu_jet2_cpu", [&] {
    using math_t = at::opmath_type<scalar_t>;
    const math_t* d1p = d1.data_ptr<math_t>();
    const math_t* d2p = d2.data_ptr<math_t>();
    const scalar_t* ap = x1c.data_ptr<scalar_t>();
    const scalar_t* bp = x2c.data_ptr<scalar_t>();
    scalar_t* y1p = y1.data_ptr<scalar_t>();
    scalar_t* y2p = y2.data_ptr<scalar_t>();
    // one fused pass over the tangents; a block's g', g'' stay in cache while its N tangents stream by
    fasthess::parallel_for(0, M, kBlock, [&](int64_t begin, int64_t end) {
      for (int64_t lo = begin; lo < end; lo += kBlock) {
        const int64_t hi = std::min(end, lo + kBlock);
        for (int64_t k = 0; k < N; ++k) {
          const int64_t off = k * M;
          for (int64_t i = lo; i < hi; ++i) {
            const math_t a = static_cast<math_t>(ap[off + i]);
            y1p[off + i] = static_cast<scalar_t>(d1p[i] * a);
            y2p[off + i] = static_cast<scalar_t>(d1p[i] * static_cast<math_t>(bp[off + i]) + d2p[i] * a * a);
          }
        }
      }
    });
  });
  return {g.to(x.scalar_type()), y1, y2};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fasthess, m) {
  m.def("gelu_jet2(Tensor x, Tensor x1, Tensor x2, str approximate) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fasthess, CPU, m) { m.impl("gelu_jet2", &gelu_jet2_cpu); }

}  // namespace fasthess
