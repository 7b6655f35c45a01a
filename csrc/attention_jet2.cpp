// Attention 2-jet on the CPU: o, o1, o2 of softmax(q kᵀ·scale + mask) v for N tangent pairs.
// Spec: fasthess/kernels/attention/reference.py (the math is in fasthess/kernels/attention/online.py).
//
// Work item = (batch·head, block of BM query rows), spread over threads by fasthess::parallel_for (parallel.h).
// Per item the primal scores and P = softmax(S) of the block (BM × Tk, never T × T) are computed
// once and shared by all N tangents; per tangent the block of S1, S2 is turned into P1, P2 in place
// and multiplied out. Products of blocks go to at::mm/addmm (BLAS, single-threaded inside the
// parallel region); the softmax-jet statistics are fused loops over each row.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include "parallel.h"
#include <torch/library.h>

#include "attention_softmax.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "jet2_checks.h"

namespace fasthess {
namespace {

constexpr int64_t kBlockRows = 64;

// Row-wise jet of the softmax on a block: p (rows × cols) holds P; s1, s2 hold the tangent scores
// and are overwritten with P1 and P2. Masked entries have p == 0 and give 0. A null s1 is a zero
// first-order score block (P1 = 0, P2 = P ⊙ (s2 − μ2)).
template <typename scalar_t>
void softmax_jet_rows(const scalar_t* p, scalar_t* s1, scalar_t* s2, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* pr = p + i * cols;
    scalar_t* a = s1 ? s1 + i * cols : nullptr;
    scalar_t* b = s2 + i * cols;
    scalar_t mu1 = 0, mu2 = 0, var = 0;
    for (int64_t j = 0; j < cols; ++j) mu2 += pr[j] * b[j];
    if (a == nullptr) {
      for (int64_t j = 0; j < cols; ++j) b[j] = pr[j] * (b[j] - mu2);
      continue;
    }
    for (int64_t j = 0; j < cols; ++j) mu1 += pr[j] * a[j];
    for (int64_t j = 0; j < cols; ++j) {
      const scalar_t d = a[j] - mu1;
      var += pr[j] * d * d;
    }
    for (int64_t j = 0; j < cols; ++j) {
      const scalar_t d = a[j] - mu1;
      b[j] = pr[j] * (b[j] - mu2 + d * d - var);
      a[j] = pr[j] * d;
    }
  }
}

// view of an optional (N, B, H, T, D) tangent as (N, B·H, T, D); undefined when absent
at::Tensor tangent_view(const std::optional<at::Tensor>& t, int64_t n, int64_t bh, int64_t rows, int64_t d) {
  return t.has_value() ? t->contiguous().view({n, bh, rows, d}) : at::Tensor();
}

// out (+)= alpha · a @ b, skipped when a factor is undefined (a zero tangent); out starts undefined
void add_product(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double alpha = 1.0) {
  if (!a.defined() || !b.defined()) return;
  if (!out.defined()) {
    out = at::mm(a, b);
    if (alpha != 1.0) out.mul_(alpha);
  } else {
    out.addmm_(a, b, 1.0, alpha);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_jet2_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& q1,
    const std::optional<at::Tensor>& k1, const std::optional<at::Tensor>& v1, const std::optional<at::Tensor>& q2,
    const std::optional<at::Tensor>& k2, const std::optional<at::Tensor>& v2,
    const std::optional<at::Tensor>& keep_opt, bool causal, double scale) {
  const int64_t n = check_attention_jet2_inputs(q, k, v, q1, k1, v1, q2, k2, v2, keep_opt);
  at::NoGradGuard no_grad;  // a 2-jet is not differentiated, and mm_out refuses inputs that require grad
  const int64_t B = q.size(0), H = q.size(1), TQ = q.size(2), D = q.size(3), TK = k.size(2), BH = B * H;
  at::Tensor keep;
  if (keep_opt.has_value()) keep = keep_opt->to(at::kBool).contiguous();
  auto q3 = q.contiguous().view({BH, TQ, D});
  auto k3 = k.contiguous().view({BH, TK, D});
  auto v3 = v.contiguous().view({BH, TK, D});
  // absent tangents stay undefined: their products are skipped, never done with zeros
  auto q1c = tangent_view(q1, n, BH, TQ, D), q2c = tangent_view(q2, n, BH, TQ, D);
  auto k1c = tangent_view(k1, n, BH, TK, D), k2c = tangent_view(k2, n, BH, TK, D);
  auto v1c = tangent_view(v1, n, BH, TK, D), v2c = tangent_view(v2, n, BH, TK, D);
  auto o = at::zeros({BH, TQ, D}, q.options());
  auto o1 = at::zeros({n, BH, TQ, D}, q.options());
  auto o2 = at::zeros({n, BH, TQ, D}, q.options());
  const int64_t nblk = (TQ + kBlockRows - 1) / kBlockRows;
  if (TQ > 0 && TK > 0) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_jet2_cpu", [&] {
      fasthess::parallel_for(0, BH * nblk, 1, [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t bh = item / nblk, i0 = (item % nblk) * kBlockRows;
          const int64_t rows = std::min(kBlockRows, TQ - i0);
          const int64_t cols = causal ? std::min(TK, i0 + rows) : TK;  // later keys are masked for every row
          if (cols <= 0) continue;  // causal with Tq > Tk rows: nothing visible, outputs stay 0
          const bool* kp = keep.defined() ? keep.data_ptr<bool>() + (bh / H) * TK : nullptr;
          auto qb = q3[bh].narrow(0, i0, rows);
          auto kt = k3[bh].narrow(0, 0, cols).t();
          auto vb = v3[bh].narrow(0, 0, cols);
          auto p = at::mm(qb, kt).mul_(scale);
          masked_softmax_rows<scalar_t>(p.data_ptr<scalar_t>(), rows, cols, i0, causal, kp);
          at::Tensor ob = o[bh].narrow(0, i0, rows);
          at::mm_out(ob, p, vb);
          auto qrows = [&](const at::Tensor& t, int64_t i) { return t.defined() ? t[i][bh].narrow(0, i0, rows) : t; };
          auto keys = [&](const at::Tensor& t, int64_t i) { return t.defined() ? t[i][bh].narrow(0, 0, cols) : t; };
          auto keys_t = [&](const at::Tensor& t, int64_t i) { return t.defined() ? keys(t, i).t() : t; };
          for (int64_t t = 0; t < n; ++t) {
            auto q1b = qrows(q1c, t), q2b = qrows(q2c, t);
            auto k1t = keys_t(k1c, t), k2t = keys_t(k2c, t);
            auto v1b = keys(v1c, t), v2b = keys(v2c, t);
            at::Tensor s1, s2;  // scale · (q1 kᵀ + q k1ᵀ), scale · (q2 kᵀ + 2 q1 k1ᵀ + q k2ᵀ): given terms only
            add_product(s1, q1b, kt);
            add_product(s1, qb, k1t);
            add_product(s2, q2b, kt);
            add_product(s2, q1b, k1t, 2.0);
            add_product(s2, qb, k2t);
            if (s1.defined()) s1.mul_(scale);
            if (s2.defined()) s2.mul_(scale);
            if (s1.defined() && !s2.defined()) s2 = at::zeros_like(s1);  // P2 depends on s1: it needs the buffer
            if (s2.defined())
              softmax_jet_rows<scalar_t>(p.data_ptr<scalar_t>(), s1.defined() ? s1.data_ptr<scalar_t>() : nullptr,
                                         s2.data_ptr<scalar_t>(), rows, cols);
            // now s1 = P1, s2 = P2 (undefined: 0); o1, o2 start at 0
            at::Tensor o1b = o1[t][bh].narrow(0, i0, rows), o2b = o2[t][bh].narrow(0, i0, rows);
            if (s1.defined()) o1b.addmm_(s1, vb);  // P1 v + P v1
            if (v1b.defined()) o1b.addmm_(p, v1b);
            if (s2.defined()) o2b.addmm_(s2, vb);  // P2 v + 2 P1 v1 + P v2
            if (s1.defined() && v1b.defined()) o2b.addmm_(s1, v1b, 1, 2);
            if (v2b.defined()) o2b.addmm_(p, v2b);
          }
        }
      });
    });
  }
  return {o.view(q.sizes()), o1.view({n, B, H, TQ, D}), o2.view({n, B, H, TQ, D})};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fasthess, m) {
  m.def(
      "attention_jet2(Tensor q, Tensor k, Tensor v, Tensor? q1, Tensor? k1, Tensor? v1, Tensor? q2, Tensor? k2, "
      "Tensor? v2, Tensor? keep, bool causal, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fasthess, CPU, m) { m.impl("attention_jet2", &attention_jet2_cpu); }

}  // namespace fasthess
