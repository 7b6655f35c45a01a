// fasthess C++ CPU ops, registered with the dispatcher through TORCH_LIBRARY.
// Python sees them as torch.ops.fasthess.*; the pure-torch references live in
// fasthess/kernels/*/reference.py and define what each op must compute.
#include <Python.h>
#include "parallel.h"
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "linear_checks.h"

namespace fasthess {

// Merge k samples s_j = z_j * hz_j into running (mean, m2) over `count` earlier
// samples (Chan et al.'s parallel Welford update). z, hz: (k, n); mean, m2: (n,).
template <typename scalar_t>
static void hutchinson_update_kernel(scalar_t* mean, scalar_t* m2, const scalar_t* z,
                                     const scalar_t* hz, int64_t k, int64_t n, int64_t count) {
  const double total = static_cast<double>(count + k);
  const double cross = static_cast<double>(count) * k / total;
  fasthess::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      // Welford over the new batch for this coordinate, in double.
      double bmean = 0.0, bm2 = 0.0;
      for (int64_t j = 0; j < k; ++j) {
        const double s = static_cast<double>(z[j * n + i]) * static_cast<double>(hz[j * n + i]);
        const double d = s - bmean;
        bmean += d / static_cast<double>(j + 1);
        bm2 += d * (s - bmean);
      }
      const double delta = bmean - static_cast<double>(mean[i]);
      m2[i] = static_cast<scalar_t>(static_cast<double>(m2[i]) + bm2 + delta * delta * cross);
      mean[i] = static_cast<scalar_t>(static_cast<double>(mean[i]) + delta * (k / total));
    }
  });
}

void hutchinson_update_cpu(at::Tensor mean, at::Tensor m2, const at::Tensor& z, const at::Tensor& hz,
                           int64_t count) {
  check_hutchinson_update_inputs(mean, m2, z, hz, count);
  const auto zc = z.contiguous();
  const auto hzc = hz.contiguous();
  if (z.size(0) == 0) return;
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "hutchinson_update_", [&] {
    hutchinson_update_kernel<scalar_t>(mean.data_ptr<scalar_t>(), m2.data_ptr<scalar_t>(),
                                       zc.data_ptr<scalar_t>(), hzc.data_ptr<scalar_t>(), z.size(0),
                                       z.size(1), count);
  });
}

TORCH_LIBRARY(fasthess, m) {
  m.def("hutchinson_update_(Tensor(a!) mean, Tensor(b!) m2, Tensor z, Tensor hz, int count) -> ()");
}

TORCH_LIBRARY_IMPL(fasthess, CPU, m) { m.impl("hutchinson_update_", &hutchinson_update_cpu); }

}  // namespace fasthess

// A module with no Python functions: importing fasthess._C runs the static
// registrations above, which is all it is for.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
