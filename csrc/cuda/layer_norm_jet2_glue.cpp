// torch glue of the CUDA layer-norm 2-jet kernel (compiled only against a CUDA torch, see setup.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../jet2_checks.h"
#include "layer_norm_jet2.h"

namespace fasthess {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_jet2_cuda(const at::Tensor& x,
                                                                    const std::optional<at::Tensor>& weight,
                                                                    const std::optional<at::Tensor>& bias,
                                                                    const at::Tensor& x1,
                                                                    const std::optional<at::Tensor>& x2, double eps) {
  check_layer_norm_jet2_inputs(x, weight, bias, x1, x2);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "the CUDA layer_norm_jet2 kernel takes float32 or float64, got ", x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t D = x.size(-1), R = x.numel() / D, N = x1.size(0);
  auto xc = x.contiguous(), x1c = x1.contiguous();
  const auto x2c = x2.has_value() ? x2->contiguous() : at::Tensor();  // undefined: zero, skipped by the kernel
  const auto wc = weight.has_value() ? weight->contiguous() : at::Tensor();
  const auto bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  auto y = at::empty_like(xc), y1 = at::empty_like(x1c), y2 = at::empty_like(x1c);
  cudaError_t err = cudaSuccess;
  const auto stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "layer_norm_jet2_cuda", [&] {
    err = fasthess_cuda::layer_norm_jet2<scalar_t>(
        xc.data_ptr<scalar_t>(), wc.defined() ? wc.data_ptr<scalar_t>() : nullptr,
        bc.defined() ? bc.data_ptr<scalar_t>() : nullptr, x1c.data_ptr<scalar_t>(),
        x2c.defined() ? x2c.data_ptr<scalar_t>() : nullptr,
        y.data_ptr<scalar_t>(), y1.data_ptr<scalar_t>(), y2.data_ptr<scalar_t>(), R, D, N, eps, stream);
  });
  TORCH_CHECK(err == cudaSuccess, "layer_norm_jet2 CUDA launch failed: ", cudaGetErrorString(err));
  return {y, y1, y2};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthess, CUDA, m) { m.impl("layer_norm_jet2", &layer_norm_jet2_cuda); }

}  // namespace fasthess
