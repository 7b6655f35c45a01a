// torch glue of the CUDA one-hot weight tangent kernel (compiled only against a CUDA torch, see setup.py):
// the CUDA implementation of fasthess::onehot_weight_tangent (csrc/linear_ops.cpp), with its input checks.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../linear_checks.h"
#include "onehot_weight_tangent.h"

namespace fasthess {
namespace {

at::Tensor onehot_weight_tangent_cuda(const at::Tensor& x, const at::Tensor& rows, const at::Tensor& cols,
                                      int64_t out_features) {
  check_onehot_weight_tangent_inputs(x, rows, cols, out_features);
  TORCH_CHECK(x.element_size() == 2 || x.element_size() == 4 || x.element_size() == 8,
              "the CUDA onehot_weight_tangent kernel takes 2, 4 or 8-byte elements, got ", x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t in = x.size(-1), K = rows.size(0), M = in == 0 ? 0 : x.numel() / in;
  const auto rc = rows.contiguous(), cc = cols.contiguous();
  {  // the CPU op's coordinate check, on a host copy of the K coordinates (a small copy, one sync)
    const auto rh = rc.cpu(), ch = cc.cpu();
    check_onehot_coordinates(rh.data_ptr<int64_t>(), ch.data_ptr<int64_t>(), K, out_features, in);
  }
  std::vector<int64_t> shape{K};
  for (int64_t d = 0; d + 1 < x.dim(); ++d) shape.push_back(x.size(d));
  shape.push_back(out_features);
  auto out = at::empty(shape, x.options());  // the kernel writes every entry
  if (in == 0) return out.zero_();  // no x entries; every direction is a zero one (M counts no rows)
  const auto xc = x.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const cudaError_t err = fasthess_cuda::onehot_weight_tangent(
      xc.data_ptr(), rc.data_ptr<int64_t>(), cc.data_ptr<int64_t>(), out.data_ptr(), K, M, in, out_features,
      static_cast<int>(x.element_size()), stream);
  TORCH_CHECK(err == cudaSuccess, "onehot_weight_tangent CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthess, CUDA, m) { m.impl("onehot_weight_tangent", &onehot_weight_tangent_cuda); }

}  // namespace fasthess
