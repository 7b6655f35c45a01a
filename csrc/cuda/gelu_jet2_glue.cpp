// torch glue of the CUDA GELU 2-jet kernel (compiled only against a CUDA torch, see setup.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../jet2_checks.h"
#include "gelu_jet2.h"

namespace fasthess {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> gelu_jet2_cuda(const at::Tensor& x, const at::Tensor& x1,
                                                              const at::Tensor& x2, c10::string_view approximate) {
  check_gelu_jet2_inputs(x, x1, x2, approximate);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "the CUDA gelu_jet2 kernel takes float32 or float64, got ", x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous(), x1c = x1.contiguous(), x2c = x2.contiguous();
  auto y = at::empty_like(xc), y1 = at::empty_like(x1c), y2 = at::empty_like(x1c);
  cudaError_t err = cudaSuccess;
  const auto stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gelu_jet2_cuda", [&] {
    err = fasthess_cuda::gelu_jet2<scalar_t>(xc.data_ptr<scalar_t>(), x1c.data_ptr<scalar_t>(),
                                             x2c.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                             y1.data_ptr<scalar_t>(), y2.data_ptr<scalar_t>(), xc.numel(),
                                             x1.size(0), approximate == "tanh", stream);
  });
  TORCH_CHECK(err == cudaSuccess, "gelu_jet2 CUDA launch failed: ", cudaGetErrorString(err));
  return {y, y1, y2};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthess, CUDA, m) { m.impl("gelu_jet2", &gelu_jet2_cuda); }

}  // namespace fasthess
