// torch glue of the CUDA cross-entropy 2-jet kernel (compiled only against a CUDA torch, see setup.py).
// Same schema and input checks (csrc/jet2_checks.h) as the CPU op in csrc/loss_ops.cpp. The targets' range is
// not checked here (that would cost a host sync; fasthess.kernels.loss.cross_entropy_jet2 checks it): the
// kernel never reads outside a row, and a target outside [0, V) makes the outputs NaN.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../jet2_checks.h"
#include "cross_entropy_jet2.h"

namespace fasthess {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_jet2_cuda(const at::Tensor& z, const at::Tensor& y,
                                                                       const at::Tensor& z1,
                                                                       const std::optional<at::Tensor>& z2,
                                                                       int64_t ignore_index) {
  check_cross_entropy_jet2_inputs(z, y, z1, z2);
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
              "the CUDA cross_entropy_jet2 kernel takes float32 or float64, got ", z.scalar_type());
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t K = z1.size(0), N = z.size(0), V = z.size(1);
  auto zc = z.contiguous(), z1c = z1.contiguous(), yc = y.contiguous();
  const at::Tensor z2c = z2.has_value() ? z2->contiguous() : at::Tensor();  // none: zero, not read
  // per-row terms, summed below by torch in a fixed order (deterministic)
  auto rows0 = at::empty({N}, zc.options()), rows1 = at::empty({K, N}, zc.options()),
       rows2 = at::empty({K, N}, zc.options());
  cudaError_t err = cudaSuccess;
  const auto stream = c10::cuda::getCurrentCUDAStream(z.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "cross_entropy_jet2_cuda", [&] {
    err = fasthess_cuda::cross_entropy_jet2_rows<scalar_t>(
        zc.data_ptr<scalar_t>(), yc.data_ptr<int64_t>(), z1c.data_ptr<scalar_t>(),
        z2c.defined() ? z2c.data_ptr<scalar_t>() : nullptr, rows0.data_ptr<scalar_t>(), rows1.data_ptr<scalar_t>(),
        rows2.data_ptr<scalar_t>(), N, V, K, ignore_index, stream);
  });
  TORCH_CHECK(err == cudaSuccess, "cross_entropy_jet2 CUDA launch failed: ", cudaGetErrorString(err));
  const auto count = yc.ne(ignore_index).sum().to(z.scalar_type());  // 0 rows kept: 0/0 = NaN, as the CPU op
  return {rows0.sum().div(count), rows1.sum(1).div(count), rows2.sum(1).div(count)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthess, CUDA, m) { m.impl("cross_entropy_jet2", &cross_entropy_jet2_cuda); }

}  // namespace fasthess
