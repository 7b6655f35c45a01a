// Input checks of the 2-jet ops, shared by their CPU kernels (csrc/*.cpp) and the torch glue of their
// CUDA kernels (csrc/cuda/*_glue.cpp): one contract, one set of messages. Backend limits (dtypes the
// kernel takes, head dims) stay with each backend.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace fasthess {

// q (B, H, Tq, D); k, v (B, H, Tk, D); q1, q2 (N, *q.shape); k1, v1, k2, v2 (N, *k.shape); keep (B, Tk)
// or none; every tensor of q's dtype and device. A tangent may be absent (zero); one of q1, k1, v1 must
// be given: it sets N, which is returned.
inline int64_t check_attention_jet2_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const std::optional<at::Tensor>& q1, const std::optional<at::Tensor>& k1,
                                           const std::optional<at::Tensor>& v1, const std::optional<at::Tensor>& q2,
                                           const std::optional<at::Tensor>& k2, const std::optional<at::Tensor>& v2,
                                           const std::optional<at::Tensor>& keep) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be (B, H, T, D)");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "k and v must be (B, H, Tk, D) with the B, H, D of q");
  const std::optional<at::Tensor>* first = q1.has_value() ? &q1 : k1.has_value() ? &k1 : &v1;
  TORCH_CHECK(first->has_value(), "at least one of q1, k1, v1 must be a tensor (it sets N)");
  const int64_t n = (*first)->dim() >= 1 ? (*first)->size(0) : -1;
  for (const auto* t : {&q1, &q2})
    TORCH_CHECK(!t->has_value() || ((*t)->dim() == 5 && (*t)->size(0) == n && (*t)->sizes().slice(1) == q.sizes()),
                "q1, q2 must be (N, *q.shape)");
  for (const auto* t : {&k1, &v1, &k2, &v2})
    TORCH_CHECK(!t->has_value() || ((*t)->dim() == 5 && (*t)->size(0) == n && (*t)->sizes().slice(1) == k.sizes()),
                "k1, v1, k2, v2 must be (N, *k.shape)");
  for (const at::Tensor* t : {&k, &v}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "all inputs must share one dtype");
    TORCH_CHECK(t->device() == q.device(), "all inputs must be on one device");
  }
  for (const auto* t : {&q1, &k1, &v1, &q2, &k2, &v2}) {
    if (!t->has_value()) continue;
    TORCH_CHECK((*t)->scalar_type() == q.scalar_type(), "all inputs must share one dtype");
    TORCH_CHECK((*t)->device() == q.device(), "all inputs must be on one device");
  }
  if (keep.has_value())
    TORCH_CHECK(keep->dim() == 2 && keep->size(0) == q.size(0) && keep->size(1) == k.size(2),
                "keep must be (B, Tk)");
  return n;
}

// x (..., D) with D > 0; weight, bias (D,) or none; x1 (N, *x.shape), x2 like x1 or none (zero);
// one dtype and device.
inline void check_layer_norm_jet2_inputs(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                         const std::optional<at::Tensor>& bias, const at::Tensor& x1,
                                         const std::optional<at::Tensor>& x2) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "x must be (..., D) with D > 0");
  TORCH_CHECK(x1.dim() == x.dim() + 1 && x1.sizes().slice(1) == x.sizes() &&
                  (!x2.has_value() || x2->sizes() == x1.sizes()),
              "x1 and x2 must be (N, *x.shape)");
  for (const at::Tensor* t : {&x1, x2.has_value() ? &*x2 : &x1}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "x, x1, x2 must share one dtype");
    TORCH_CHECK(t->device() == x.device(), "x, x1, x2 must be on one device");
  }
  const int64_t d = x.size(-1);
  for (const auto& [t, name] : {std::pair{&weight, "weight"}, std::pair{&bias, "bias"}}) {
    if (!t->has_value()) continue;
    TORCH_CHECK((*t)->dim() == 1 && (*t)->size(0) == d, name, " must be (D,) with D = x.shape[-1] = ", d);
    TORCH_CHECK((*t)->scalar_type() == x.scalar_type(), name, " must have x's dtype");
    TORCH_CHECK((*t)->device() == x.device(), name, " must be on x's device");
  }
}

// x floating point of any shape; x1, x2 (N, *x.shape) of x's dtype and device; approximate "none" or "tanh".
inline void check_gelu_jet2_inputs(const at::Tensor& x, const at::Tensor& x1, const at::Tensor& x2,
                                   c10::string_view approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh", "approximate must be 'none' or 'tanh', got '",
              std::string(approximate), "'");
  TORCH_CHECK(x1.dim() == x.dim() + 1 && x1.sizes().slice(1) == x.sizes() && x2.sizes() == x1.sizes(),
              "x1 and x2 must be (N, *x.shape)");
  for (const auto* t : {&x1, &x2}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "x, x1, x2 must share one dtype");
    TORCH_CHECK(t->device() == x.device(), "x, x1, x2 must be on one device");
  }
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be floating point, got ", x.scalar_type());
}

// z (N, V) with V > 0; y (N,) int64 on z's device; z1 (K, N, V) and z2 (z1's shape, or none) of z's dtype and
// device. The targets' range is the kernels' business (the CPU kernel checks it in its pass over the rows).
inline void check_cross_entropy_jet2_inputs(const at::Tensor& z, const at::Tensor& y, const at::Tensor& z1,
                                            const std::optional<at::Tensor>& z2) {
  TORCH_CHECK(z.dim() == 2 && z.size(1) > 0, "z must be (N, V) logits with V > 0");
  TORCH_CHECK(y.dim() == 1 && y.size(0) == z.size(0) && y.scalar_type() == at::kLong, "y must be (N,) int64");
  TORCH_CHECK(y.device() == z.device(), "y must be on z's device");
  TORCH_CHECK(z1.dim() == 3 && z1.sizes().slice(1) == z.sizes(), "z1 must be (K, N, V) with (N, V) = z.shape");
  TORCH_CHECK(!z2.has_value() || z2->sizes() == z1.sizes(), "z2 must be None or of z1's shape (K, N, V)");
  for (const at::Tensor* t : {&z1, z2.has_value() ? &*z2 : &z1}) {
    TORCH_CHECK(t->scalar_type() == z.scalar_type(), "z, z1, z2 must share one dtype");
    TORCH_CHECK(t->device() == z.device(), "z, z1, z2 must be on one device");
  }
  TORCH_CHECK(at::isFloatingType(z.scalar_type()), "z must be floating point, got ", z.scalar_type());
}

}  // namespace fasthess

// --- attention HVP (csrc/attention_hvp.cpp, csrc/cuda/attention_hvp_glue.cpp) ---
namespace fasthess {

// q, dout (B, H, Tq, D); k, v (B, H, Tk, D); q1, dout1 (N, *q.shape); k1, v1 (N, *k.shape); keep (B, Tk) or
// none; every tensor of q's dtype and device.
inline void check_attention_hvp_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& dout, const at::Tensor& q1, const at::Tensor& k1,
                                       const at::Tensor& v1, const at::Tensor& dout1,
                                       const std::optional<at::Tensor>& keep) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be (B, H, T, D)");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "k and v must be (B, H, Tk, D) with the B, H, D of q");
  TORCH_CHECK(dout.sizes() == q.sizes(), "dout must have q's shape (B, H, Tq, D)");
  const int64_t n = q1.dim() > 0 ? q1.size(0) : -1;
  for (const auto* t : {&q1, &dout1})
    TORCH_CHECK(t->dim() == 5 && t->size(0) == n && t->sizes().slice(1) == q.sizes(),
                "q1, dout1 must be (N, *q.shape)");
  for (const auto* t : {&k1, &v1})
    TORCH_CHECK(t->dim() == 5 && t->size(0) == n && t->sizes().slice(1) == k.sizes(), "k1, v1 must be (N, *k.shape)");
  for (const auto* t : {&k, &v, &dout, &q1, &k1, &v1, &dout1}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "all inputs must share one dtype");
    TORCH_CHECK(t->device() == q.device(), "all inputs must be on one device");
  }
  if (keep.has_value())
    TORCH_CHECK(keep->dim() == 2 && keep->size(0) == q.size(0) && keep->size(1) == k.size(2), "keep must be (B, Tk) bool");
}

}  // namespace fasthess
