// torch glue of the CUDA Hutchinson accumulation kernels (compiled only against a CUDA torch, see setup.py):
// CUDA implementations of fasthess::hutchinson_update_ (csrc/fasthess_ops.cpp) and
// fasthess::hutchinson_update_seeded_ (csrc/linear_ops.cpp), with the CPU ops' input checks.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../linear_checks.h"
#include "../probe_hash.h"
#include "hutchinson_update.h"

namespace fasthess {
namespace {

void check_hutchinson_cuda_dtype(const at::Tensor& mean, const char* op) {
  TORCH_CHECK(mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble, "the CUDA ", op,
              " kernel takes float32 or float64 statistics, got ", mean.scalar_type());
}

void hutchinson_update_cuda(at::Tensor mean, at::Tensor m2, const at::Tensor& z, const at::Tensor& hz,
                            int64_t count) {
  check_hutchinson_update_inputs(mean, m2, z, hz, count);
  check_hutchinson_cuda_dtype(mean, "hutchinson_update_");
  const c10::cuda::CUDAGuard guard(mean.device());
  const auto zc = z.contiguous(), hzc = hz.contiguous();
  cudaError_t err = cudaSuccess;
  const auto stream = c10::cuda::getCurrentCUDAStream(mean.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "hutchinson_update_cuda", [&] {
    err = fasthess_cuda::hutchinson_update<scalar_t>(mean.data_ptr<scalar_t>(), m2.data_ptr<scalar_t>(),
                                                     zc.data_ptr<scalar_t>(), hzc.data_ptr<scalar_t>(), z.size(0),
                                                     z.size(1), count, stream);
  });
  TORCH_CHECK(err == cudaSuccess, "hutchinson_update_ CUDA launch failed: ", cudaGetErrorString(err));
}

void hutchinson_update_seeded_cuda(at::Tensor mean, at::Tensor m2, const at::Tensor& hz, int64_t seed,
                                   int64_t first_probe, int64_t count) {
  check_hutchinson_update_seeded_inputs(mean, m2, hz, first_probe, count);
  check_hutchinson_cuda_dtype(mean, "hutchinson_update_seeded_");
  const c10::cuda::CUDAGuard guard(mean.device());
  const auto hzc = hz.contiguous();
  const uint32_t seed_hash = fasthess_hash::hash32(static_cast<uint32_t>(seed & 0xFFFFFFFF));
  cudaError_t err = cudaSuccess;
  const auto stream = c10::cuda::getCurrentCUDAStream(mean.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "hutchinson_update_seeded_cuda", [&] {
    err = fasthess_cuda::hutchinson_update_seeded<scalar_t>(mean.data_ptr<scalar_t>(), m2.data_ptr<scalar_t>(),
                                                            hzc.data_ptr<scalar_t>(), hz.size(0), hz.size(1),
                                                            seed_hash, first_probe, count, stream);
  });
  TORCH_CHECK(err == cudaSuccess, "hutchinson_update_seeded_ CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthess, CUDA, m) {
  m.impl("hutchinson_update_", &hutchinson_update_cuda);
  m.impl("hutchinson_update_seeded_", &hutchinson_update_seeded_cuda);
}

}  // namespace fasthess
