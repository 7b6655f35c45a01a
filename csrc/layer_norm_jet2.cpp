// 2-jet of layer norm over the last dim on the CPU. Spec: fasthess/kernels/layer_norm/reference.py.
// Per row, with r = (var + eps)^(-1/2), x̂ = (x - mean) r and the centred, scaled tangents
// u1 = (x1 - mean x1) r, u2 = (x2 - mean x2) r:
//   s1 = mean(x̂ u1), q = mean(u1²), s2 = mean(x̂ u2),
//   ŷ1 = u1 - s1 x̂,   ŷ2 = u2 - 2 s1 u1 + (3 s1² - q - s2) x̂,   y_i = weight ⊙ ŷ_i.
// The primal statistics (mean, r, x̂) of a row are computed once and shared by its N tangents.
// An absent x2 (zero) drops u2 and s2: no reads, no products.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include "parallel.h"
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "jet2_checks.h"

namespace fasthess {
namespace {

std::vector<double> affine_or(const std::optional<at::Tensor>& t, int64_t d, double fill) {
  if (!t.has_value()) return std::vector<double>(d, fill);
  auto c = t->to(at::kDouble).contiguous();
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + d);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_jet2_cpu(const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   const at::Tensor& x1,
                                                                   const std::optional<at::Tensor>& x2, double eps) {
  check_layer_norm_jet2_inputs(x, weight, bias, x1, x2);
  const int64_t D = x.size(-1), R = x.numel() / D, N = x1.size(0);
  const std::vector<double> w = affine_or(weight, D, 1.0), b = affine_or(bias, D, 0.0);
  auto xc = x.contiguous(), x1c = x1.contiguous();
  const at::Tensor x2c = x2.has_value() ? x2->contiguous() : at::Tensor();
  auto y = at::empty_like(xc), y1 = at::empty_like(x1c), y2 = at::empty_like(x1c);
  if (R == 0) return {y, y1, y2};
  const double inv_d = 1.0 / static_cast<double>(D);
  // enough rows per task to amortise the scheduling (~32k elements read)
  const int64_t grain = std::max<int64_t>(1, 32768 / (D * ((x2c.defined() ? 2 : 1) * N + 1)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_jet2_cpu", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* ap = x1c.data_ptr<scalar_t>();
    const scalar_t* bp = x2c.defined() ? x2c.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* y1p = y1.data_ptr<scalar_t>();
    scalar_t* y2p = y2.data_ptr<scalar_t>();
    fasthess::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
      std::vector<double> xh(D);
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* xr = xp + row * D;
        double mean = 0.0, var = 0.0;
        for (int64_t v = 0; v < D; ++v) mean += static_cast<double>(xr[v]);
        mean *= inv_d;
        for (int64_t v = 0; v < D; ++v) {
          const double c = static_cast<double>(xr[v]) - mean;
          var += c * c;  // two passes: no cancellation of E[x²] - E[x]²
        }
        const double r = 1.0 / std::sqrt(var * inv_d + eps);
        for (int64_t v = 0; v < D; ++v) {
          xh[v] = (static_cast<double>(xr[v]) - mean) * r;
          yp[row * D + v] = static_cast<scalar_t>(w[v] * xh[v] + b[v]);
        }
        for (int64_t k = 0; k < N; ++k) {
          const int64_t off = (k * R + row) * D;
          const scalar_t* a = ap + off;
          const scalar_t* c = bp ? bp + off : nullptr;
          double m1 = 0.0, m2 = 0.0;
          for (int64_t v = 0; v < D; ++v) m1 += static_cast<double>(a[v]);
          if (c)
            for (int64_t v = 0; v < D; ++v) m2 += static_cast<double>(c[v]);
          m1 *= inv_d;
          m2 *= inv_d;
          double s1 = 0.0, q = 0.0, s2 = 0.0;
          for (int64_t v = 0; v < D; ++v) {
            const double u1 = (static_cast<double>(a[v]) - m1) * r;
            s1 += xh[v] * u1;
            q += u1 * u1;
          }
          if (c)
            for (int64_t v = 0; v < D; ++v) s2 += xh[v] * (static_cast<double>(c[v]) - m2) * r;
          s1 *= inv_d;
          const double coef = 3.0 * s1 * s1 - (q + s2) * inv_d;
          for (int64_t v = 0; v < D; ++v) {
            const double u1 = (static_cast<double>(a[v]) - m1) * r;
            const double u2 = c ? (static_cast<double>(c[v]) - m2) * r : 0.0;
            y1p[off + v] = static_cast<scalar_t>(w[v] * (u1 - s1 * xh[v]));
            y2p[off + v] = static_cast<scalar_t>(w[v] * (u2 - 2.0 * s1 * u1 + coef * xh[v]));
          }
        }
      }
    });
  });
  return {y, y1, y2};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fasthess, m) {
  m.def(
      "layer_norm_jet2(Tensor x, Tensor? weight, Tensor? bias, Tensor x1, Tensor? x2, float eps) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fasthess, CPU, m) { m.impl("layer_norm_jet2", &layer_norm_jet2_cpu); }

}  // namespace fasthess
