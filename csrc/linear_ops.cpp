// Linear-layer tangent ops on the CPU. Specs: fasthess/kernels/linear/reference.py; input checks shared
// with the CUDA glue (linear_checks.h), the probe hash with the CUDA kernel (probe_hash.h).
//  * onehot_weight_tangent: x E_kᵀ for one-hot weight directions, written straight into the output
//    (no (K, out, in) seed, no matmul).
//  * hutchinson_update_seeded_: the fused Hutchinson accumulation with Rademacher probes regenerated
//    from (seed, probe index, coordinate) by a counter-based hash instead of read from memory.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include "parallel.h"
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "linear_checks.h"
#include "probe_hash.h"

namespace fasthess {
namespace {

at::Tensor onehot_weight_tangent_cpu(const at::Tensor& x, const at::Tensor& rows, const at::Tensor& cols,
                                     int64_t out_features) {
  check_onehot_weight_tangent_inputs(x, rows, cols, out_features);
  const int64_t in = x.size(-1), K = rows.size(0), M = in == 0 ? 0 : x.numel() / in;
  auto xc = x.contiguous();
  auto rc = rows.contiguous(), cc = cols.contiguous();
  const int64_t* r = rc.data_ptr<int64_t>();
  const int64_t* c = cc.data_ptr<int64_t>();
  check_onehot_coordinates(r, c, K, out_features, in);
  std::vector<int64_t> shape{K};
  for (int64_t d = 0; d + 1 < x.dim(); ++d) shape.push_back(x.size(d));
  shape.push_back(out_features);
  auto out = at::zeros(shape, x.options());
  if (K == 0 || M == 0 || out_features == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "onehot_weight_tangent", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    fasthess::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        if (r[k] < 0) continue;  // a zero direction
        scalar_t* dst = op + k * M * out_features + r[k];
        const scalar_t* src = xp + c[k];
        for (int64_t m = 0; m < M; ++m) dst[m * out_features] = src[m * in];
      }
    });
  });
  return out;
}

template <typename scalar_t>
void seeded_update_kernel(scalar_t* mean, scalar_t* m2, const scalar_t* hz, int64_t k, int64_t n, uint32_t seed_hash,
                          int64_t first_probe, int64_t count) {
  const double total = static_cast<double>(count + k);
  const double cross = static_cast<double>(count) * k / total;
  std::vector<uint32_t> probe_hash(k);
  for (int64_t j = 0; j < k; ++j) probe_hash[j] = fasthess_hash::probe_key(seed_hash, first_probe + j);
  constexpr int64_t kTile = 256;  // coordinates per tile: the probe loop runs over a tile (vectorised hash)
  fasthess::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
    double bmean[kTile], bm2[kTile];
    for (int64_t i0 = begin; i0 < end; i0 += kTile) {
      const int64_t len = std::min(kTile, end - i0);
      for (int64_t t = 0; t < len; ++t) bmean[t] = bm2[t] = 0.0;
      for (int64_t j = 0; j < k; ++j) {  // Welford over the batch, one probe at a time, for the whole tile
        const uint32_t ph = probe_hash[j];
        const scalar_t* row = hz + j * n + i0;
        const double inv = 1.0 / static_cast<double>(j + 1);
        for (int64_t t = 0; t < len; ++t) {
          const uint32_t bit = fasthess_hash::probe_sign_bit(ph, i0 + t);
          const double s = (1.0 - 2.0 * static_cast<double>(bit)) * static_cast<double>(row[t]);
          const double d = s - bmean[t];
          bmean[t] += d * inv;
          bm2[t] += d * (s - bmean[t]);
        }
      }
      for (int64_t t = 0; t < len; ++t) {
        const int64_t i = i0 + t;
        const double delta = bmean[t] - static_cast<double>(mean[i]);
        m2[i] = static_cast<scalar_t>(static_cast<double>(m2[i]) + bm2[t] + delta * delta * cross);
        mean[i] = static_cast<scalar_t>(static_cast<double>(mean[i]) + delta * (k / total));
      }
    }
  });
}

void hutchinson_update_seeded_cpu(at::Tensor mean, at::Tensor m2, const at::Tensor& hz, int64_t seed,
                                  int64_t first_probe, int64_t count) {
  check_hutchinson_update_seeded_inputs(mean, m2, hz, first_probe, count);
  const auto hzc = hz.contiguous();
  if (hz.size(0) == 0) return;
  const uint32_t seed_hash = fasthess_hash::hash32(static_cast<uint32_t>(seed & 0xFFFFFFFF));
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "hutchinson_update_seeded_", [&] {
    seeded_update_kernel<scalar_t>(mean.data_ptr<scalar_t>(), m2.data_ptr<scalar_t>(), hzc.data_ptr<scalar_t>(),
                                   hz.size(0), hz.size(1), seed_hash, first_probe, count);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fasthess, m) {
  m.def("onehot_weight_tangent(Tensor x, Tensor rows, Tensor cols, int out_features) -> Tensor");
  m.def(
      "hutchinson_update_seeded_(Tensor(a!) mean, Tensor(b!) m2, Tensor hz, int seed, int first_probe, int count) "
      "-> ()");
}

TORCH_LIBRARY_IMPL(fasthess, CPU, m) {
  m.impl("onehot_weight_tangent", &onehot_weight_tangent_cpu);
  m.impl("hutchinson_update_seeded_", &hutchinson_update_seeded_cpu);
}

}  // namespace fasthess
