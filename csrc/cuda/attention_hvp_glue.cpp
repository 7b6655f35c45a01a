// torch glue of the CUDA attention HVP kernels (compiled only against a CUDA torch, see setup.py): the CUDA
// implementation of fasthess::attention_hvp (schema in csrc/attention_hvp.cpp; input checks shared with the
// CPU op in csrc/jet2_checks.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "../jet2_checks.h"
#include "attention_hvp.h"

namespace fasthess {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_hvp_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout, const at::Tensor& q1,
    const at::Tensor& k1, const at::Tensor& v1, const at::Tensor& dout1, const c10::optional<at::Tensor>& keep_opt,
    bool causal, double scale) {
  at::NoGradGuard no_grad;  // as the CPU op: the inner tensor ops are never recorded
  check_attention_hvp_inputs(q, k, v, dout, q1, k1, v1, dout1, keep_opt);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "the CUDA attention_hvp kernel takes float32 or float64, got ", q.scalar_type(),
              "; use backend='triton' or 'torch' for other dtypes");
  TORCH_CHECK(q.is_cuda(), "the CUDA attention_hvp kernel takes CUDA tensors");
  const int64_t B = q.size(0), H = q.size(1), TQ = q.size(2), D = q.size(3), TK = k.size(2), n = q1.size(0);
  TORCH_CHECK(D >= 1, "head dim must be >= 1");
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(B * H <= kIntMax && TQ <= kIntMax && TK <= kIntMax && D <= kIntMax && n <= kIntMax,
              "attention_hvp: sizes must fit in int32; split the call");
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor keep;
  if (keep_opt.has_value()) keep = keep_opt->to(q.device(), at::kByte).contiguous();
  auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), doc = dout.contiguous();
  auto q1c = q1.contiguous(), k1c = k1.contiguous(), v1c = v1.contiguous(), do1c = dout1.contiguous();
  // the kernels accumulate into zeroed outputs
  auto dq = at::zeros_like(qc), dk = at::zeros_like(kc), dv = at::zeros_like(vc);
  auto dq1 = at::zeros_like(q1c), dk1 = at::zeros_like(k1c), dv1 = at::zeros_like(v1c);
  auto ws = at::empty({(int64_t)fasthess_cuda::attention_hvp_workspace_elems((int)B, (int)H, (int)TQ, (int)n)},
                      q.options());
  cudaError_t err = cudaSuccess;
  const auto stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_hvp_cuda", [&] {
    err = fasthess_cuda::attention_hvp<scalar_t>(
        qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), doc.data_ptr<scalar_t>(),
        q1c.data_ptr<scalar_t>(), k1c.data_ptr<scalar_t>(), v1c.data_ptr<scalar_t>(), do1c.data_ptr<scalar_t>(),
        keep.defined() ? keep.data_ptr<uint8_t>() : nullptr, dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
        dv.data_ptr<scalar_t>(), dq1.data_ptr<scalar_t>(), dk1.data_ptr<scalar_t>(), dv1.data_ptr<scalar_t>(),
        ws.data_ptr<scalar_t>(), (int)B, (int)H, (int)TQ, (int)TK, (int)D, (int)n, static_cast<scalar_t>(scale),
        causal, stream);
  });
  TORCH_CHECK(err != cudaErrorInvalidConfiguration, "attention_hvp: the CUDA kernels need up to 131.5 KB of shared ",
              "memory per block (compute capability 8.0 or newer); use backend='triton' or 'torch' on this GPU");
  TORCH_CHECK(err == cudaSuccess, "attention_hvp CUDA launch failed: ", cudaGetErrorString(err));
  return {dq, dk, dv, dq1, dk1, dv1};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthess, CUDA, m) { m.impl("attention_hvp", &attention_hvp_cuda); }

}  // namespace fasthess
