// torch glue of the CUDA attention 2-jet kernel (compiled only against a CUDA torch, see setup.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../jet2_checks.h"
#include "attention_jet2.h"

namespace fasthess {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_jet2_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& q1,
    const std::optional<at::Tensor>& k1, const std::optional<at::Tensor>& v1, const std::optional<at::Tensor>& q2,
    const std::optional<at::Tensor>& k2, const std::optional<at::Tensor>& v2,
    const std::optional<at::Tensor>& keep_opt, bool causal, double scale) {
  const int64_t n = check_attention_jet2_inputs(q, k, v, q1, k1, v1, q2, k2, v2, keep_opt);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "the CUDA attention_jet2 kernel takes float32 or float64");
  TORCH_CHECK(q.size(3) <= 256, "head dim must be <= 256");
  TORCH_CHECK(n >= 1, "attention_jet2 needs at least one tangent pair (N >= 1)");
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), TQ = q.size(2), D = q.size(3), TK = k.size(2);
  at::Tensor keep;
  if (keep_opt.has_value()) keep = keep_opt->to(q.device(), at::kByte).contiguous();
  auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  // an absent tangent stays undefined and reaches the kernel as nullptr (zero, skipped)
  auto opt = [](const std::optional<at::Tensor>& t) { return t.has_value() ? t->contiguous() : at::Tensor(); };
  auto q1c = opt(q1), k1c = opt(k1), v1c = opt(v1), q2c = opt(q2), k2c = opt(k2), v2c = opt(v2);
  auto o = at::zeros_like(qc), o1 = at::zeros({n, B, H, TQ, D}, q.options()), o2 = at::zeros_like(o1);
  cudaError_t err = cudaSuccess;
  const auto stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_jet2_cuda", [&] {
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
    err = fasthess_cuda::attention_jet2<scalar_t>(
        qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), ptr(q1c), ptr(k1c), ptr(v1c),
        ptr(q2c), ptr(k2c), ptr(v2c), keep.defined() ? keep.data_ptr<uint8_t>() : nullptr, o.data_ptr<scalar_t>(),
        o1.data_ptr<scalar_t>(), o2.data_ptr<scalar_t>(), (int)B, (int)H, (int)TQ, (int)TK, (int)D, (int)n,
        static_cast<scalar_t>(scale), causal, stream);
  });
  TORCH_CHECK(err == cudaSuccess, "attention_jet2 CUDA launch failed: ", cudaGetErrorString(err));
  return {o, o1, o2};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthess, CUDA, m) { m.impl("attention_jet2", &attention_jet2_cuda); }

}  // namespace fasthess
