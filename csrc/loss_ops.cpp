// 2-jet of the mean softmax cross-entropy on the CPU. Spec: fasthess/kernels/loss/reference.py.
// Per row n (p = softmax(z_n), target t):  l = lse - z_t,  l1 = Σ p z1 - z1_t,
// l2 = Σ p z2 - z2_t + Σ p z1² - (Σ p z1)² (z2 None: zero, not read).  The softmax of a row is computed
// once and shared by the K tangents; nothing of size K × N × V is formed (only the inputs exist at that size).
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_jet2_cpu(const at::Tensor& z, const at::Tensor& y,
                                                                      const at::Tensor& z1,
                                                                      const std::optional<at::Tensor>& z2,
                                                                      int64_t ignore_index) {
  check_cross_entropy_jet2_inputs(z, y, z1, z2);
  const int64_t K = z1.size(0), N = z.size(0), V = z.size(1);
  auto zc = z.contiguous(), z1c = z1.contiguous(), yc = y.contiguous();
  const at::Tensor z2c = z2.has_value() ? z2->contiguous() : at::Tensor();  // none: zero, skipped
  const int64_t* yp = yc.data_ptr<int64_t>();
  int64_t valid = 0;
  for (int64_t n = 0; n < N; ++n) {
    if (yp[n] == ignore_index) continue;
    TORCH_CHECK(yp[n] >= 0 && yp[n] < V, "target ", yp[n], " of row ", n, " is outside [0, ", V, ")");
    ++valid;
  }
  // per-row terms (double), summed afterwards in a fixed order: deterministic for any thread count
  auto opts = z.options().dtype(at::kDouble);
  auto rows0 = at::zeros({N}, opts), rows1 = at::zeros({K, N}, opts), rows2 = at::zeros({K, N}, opts);
  double* r0 = rows0.data_ptr<double>();
  double* r1 = rows1.data_ptr<double>();
  double* r2 = rows2.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "cross_entropy_jet2_cpu", [&] {
    const scalar_t* zp = zc.data_ptr<scalar_t>();
    const scalar_t* a = z1c.data_ptr<scalar_t>();
    const scalar_t* b = z2c.defined() ? z2c.data_ptr<scalar_t>() : nullptr;
    fasthess::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> p(V);
      for (int64_t n = begin; n < end; ++n) {
        const int64_t t = yp[n];
        if (t == ignore_index) continue;
        const scalar_t* row = zp + n * V;
        double mx = -INFINITY;
        for (int64_t v = 0; v < V; ++v) mx = std::max(mx, static_cast<double>(row[v]));
        double sum = 0.0;
        for (int64_t v = 0; v < V; ++v) sum += (p[v] = std::exp(static_cast<double>(row[v]) - mx));
        const double inv = 1.0 / sum;
        for (int64_t v = 0; v < V; ++v) p[v] *= inv;
        r0[n] = mx + std::log(sum) - static_cast<double>(row[t]);
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* a_row = a + (k * N + n) * V;
          double m1 = 0.0, m2 = 0.0, m3 = 0.0;
          for (int64_t v = 0; v < V; ++v) {
            const double x1 = static_cast<double>(a_row[v]);
            m1 += p[v] * x1;
            m2 += p[v] * x1 * x1;
          }
          if (b != nullptr) {
            const scalar_t* b_row = b + (k * N + n) * V;
            for (int64_t v = 0; v < V; ++v) m3 += p[v] * static_cast<double>(b_row[v]);
            m3 -= static_cast<double>(b_row[t]);
          }
          r1[k * N + n] = m1 - static_cast<double>(a_row[t]);
          r2[k * N + n] = m3 + m2 - m1 * m1;
        }
      }
    });
  });
  const double scale = valid > 0 ? 1.0 / static_cast<double>(valid) : NAN;  // as F.cross_entropy: NaN if none
  return {rows0.sum().mul(scale).to(z.scalar_type()), rows1.sum(1).mul(scale).to(z.scalar_type()),
          rows2.sum(1).mul(scale).to(z.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fasthess, m) {
  m.def("cross_entropy_jet2(Tensor z, Tensor y, Tensor z1, Tensor? z2, int ignore_index) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fasthess, CPU, m) { m.impl("cross_entropy_jet2", &cross_entropy_jet2_cpu); }

}  // namespace fasthess
