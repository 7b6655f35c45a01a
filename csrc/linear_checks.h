// Input checks of the Hutchinson accumulation and one-hot weight tangent ops, shared by their CPU kernels
// (csrc/fasthess_ops.cpp, csrc/linear_ops.cpp) and the torch glue of their CUDA kernels
// (csrc/cuda/hutchinson_update_glue.cpp, csrc/cuda/onehot_weight_tangent_glue.cpp): one contract, one set
// of messages. Backend limits (the dtypes a kernel takes) stay with each backend.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace fasthess {

// mean, m2 (n,) contiguous (updated in place), of one dtype and device; count >= 0 samples merged so far.
inline void check_hutchinson_statistics(const at::Tensor& mean, const at::Tensor& m2, int64_t count) {
  TORCH_CHECK(mean.dim() == 1 && m2.sizes() == mean.sizes(), "mean and m2 must be 1-d of equal size");
  TORCH_CHECK(mean.is_contiguous() && m2.is_contiguous(), "mean and m2 must be contiguous");
  TORCH_CHECK(m2.scalar_type() == mean.scalar_type(), "all tensors must share one dtype");
  TORCH_CHECK(m2.device() == mean.device(), "all tensors must be on one device");
  TORCH_CHECK(count >= 0, "count must be >= 0");
}

// samples (k, n) of mean's dtype and device.
inline void check_hutchinson_samples(const at::Tensor& mean, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == mean.scalar_type(), "all tensors must share one dtype");
  TORCH_CHECK(t.device() == mean.device(), "all tensors must be on one device");
}

// hutchinson_update_(mean, m2, z, hz, count): z, hz (k, n).
inline void check_hutchinson_update_inputs(const at::Tensor& mean, const at::Tensor& m2, const at::Tensor& z,
                                           const at::Tensor& hz, int64_t count) {
  check_hutchinson_statistics(mean, m2, count);
  TORCH_CHECK(z.dim() == 2 && hz.sizes() == z.sizes() && z.size(1) == mean.size(0),
              "z and hz must be (k, n) with n = mean.numel()");
  check_hutchinson_samples(mean, z);
  check_hutchinson_samples(mean, hz);
}

// hutchinson_update_seeded_(mean, m2, hz, seed, first_probe, count): hz (k, n); the probe hash takes
// 32-bit coordinates.
inline void check_hutchinson_update_seeded_inputs(const at::Tensor& mean, const at::Tensor& m2, const at::Tensor& hz,
                                                  int64_t first_probe, int64_t count) {
  check_hutchinson_statistics(mean, m2, count);
  TORCH_CHECK(hz.dim() == 2 && hz.size(1) == mean.size(0), "hz must be (k, n) with n = mean.numel()");
  check_hutchinson_samples(mean, hz);
  TORCH_CHECK(first_probe >= 0, "first_probe must be >= 0");
  TORCH_CHECK(hz.size(1) <= (int64_t(1) << 32), "at most 2^32 coordinates per tensor");
}

// onehot_weight_tangent(x, rows, cols, out_features): x (..., in); rows, cols (K,) int64 on x's device.
inline void check_onehot_weight_tangent_inputs(const at::Tensor& x, const at::Tensor& rows, const at::Tensor& cols,
                                               int64_t out_features) {
  TORCH_CHECK(x.dim() >= 1, "x must be (..., in)");
  TORCH_CHECK(rows.dim() == 1 && cols.sizes() == rows.sizes(), "rows and cols must be (K,) of equal size");
  TORCH_CHECK(rows.scalar_type() == at::kLong && cols.scalar_type() == at::kLong, "rows and cols must be int64");
  TORCH_CHECK(rows.device() == x.device() && cols.device() == x.device(), "rows and cols must be on x's device");
  TORCH_CHECK(out_features >= 0, "out_features must be >= 0");
}

// Every direction k lies in the (out_features, in) weight (rows[k] < 0: a zero direction); r, c on the host.
inline void check_onehot_coordinates(const int64_t* r, const int64_t* c, int64_t K, int64_t out_features,
                                     int64_t in) {
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(r[k] < out_features && (r[k] < 0 || (c[k] >= 0 && c[k] < in)),
                "coordinate (", r[k], ", ", c[k], ") is outside the (", out_features, ", ", in, ") weight");
  }
}

}  // namespace fasthess
