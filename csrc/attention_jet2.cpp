// Attention 2-jet on the CPU: o, o1, o2 of softmax(q kᵀ·scale + mask) v for N tangent pairs.
// Spec: fasthess/kernels/attention/reference.py (the math is in fasthess/kernels/attention/online.py).
//
// Work item = (batch·head, block of BM query rows), spread over threads by at::parallel_for.
// Per item the primal scores and P = softmax(S) of the block (BM × Tk, never T × T) are computed
// once and shared by all N tangents; per tangent the block of S1, S2 is turned into P1, P2 in place
// and multiplied out. Products of blocks go to at::mm/addmm (BLAS, single-threaded inside the
// parallel region); the softmax-jet statistics are fused loops over each row.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
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
// and are overwritten with P1 and P2. Masked entries have p == 0 and give 0.
template <typename scalar_t>
void softmax_jet_rows(const scalar_t* p, scalar_t* s1, scalar_t* s2, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* pr = p + i * cols;
    scalar_t* a = s1 + i * cols;
    scalar_t* b = s2 + i * cols;
    scalar_t mu1 = 0, mu2 = 0;
    for (int64_t j = 0; j < cols; ++j) {
      mu1 += pr[j] * a[j];
      mu2 += pr[j] * b[j];
    }
    scalar_t var = 0;
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_jet2_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q1, const at::Tensor& k1,
    const at::Tensor& v1, const at::Tensor& q2, const at::Tensor& k2, const at::Tensor& v2,
    const c10::optional<at::Tensor>& keep_opt, bool causal, double scale) {
  check_attention_jet2_inputs(q, k, v, q1, k1, v1, q2, k2, v2, keep_opt);
  at::NoGradGuard no_grad;  // a 2-jet is not differentiated, and mm_out refuses inputs that require grad
  const int64_t B = q.size(0), H = q.size(1), TQ = q.size(2), D = q.size(3), TK = k.size(2), BH = B * H;
  const int64_t n = q1.size(0);
  at::Tensor keep;
  if (keep_opt.has_value()) keep = keep_opt->to(at::kBool).contiguous();
  auto q3 = q.contiguous().view({BH, TQ, D});
  auto k3 = k.contiguous().view({BH, TK, D});
  auto v3 = v.contiguous().view({BH, TK, D});
  auto q1c = q1.contiguous().view({n, BH, TQ, D}), q2c = q2.contiguous().view({n, BH, TQ, D});
  auto k1c = k1.contiguous().view({n, BH, TK, D}), k2c = k2.contiguous().view({n, BH, TK, D});
  auto v1c = v1.contiguous().view({n, BH, TK, D}), v2c = v2.contiguous().view({n, BH, TK, D});
  auto o = at::zeros({BH, TQ, D}, q.options());
  auto o1 = at::zeros({n, BH, TQ, D}, q.options());
  auto o2 = at::zeros({n, BH, TQ, D}, q.options());
  const int64_t nblk = (TQ + kBlockRows - 1) / kBlockRows;
  if (TQ > 0 && TK > 0) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_jet2_cpu", [&] {
      at::parallel_for(0, BH * nblk, 1, [&](int64_t begin, int64_t end) {
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
          for (int64_t t = 0; t < n; ++t) {
            auto q1b = q1c[t][bh].narrow(0, i0, rows), q2b = q2c[t][bh].narrow(0, i0, rows);
            auto k1t = k1c[t][bh].narrow(0, 0, cols).t(), k2t = k2c[t][bh].narrow(0, 0, cols).t();
            auto v1b = v1c[t][bh].narrow(0, 0, cols), v2b = v2c[t][bh].narrow(0, 0, cols);
            auto s1 = at::mm(q1b, kt).addmm_(qb, k1t).mul_(scale);
            auto s2 = at::mm(q2b, kt).addmm_(q1b, k1t, 1, 2).addmm_(qb, k2t).mul_(scale);
            softmax_jet_rows<scalar_t>(p.data_ptr<scalar_t>(), s1.data_ptr<scalar_t>(), s2.data_ptr<scalar_t>(),
                                       rows, cols);
            at::Tensor o1b = o1[t][bh].narrow(0, i0, rows), o2b = o2[t][bh].narrow(0, i0, rows);
            at::mm_out(o1b, s1, vb).addmm_(p, v1b);  // P1 v + P v1
            at::mm_out(o2b, s2, vb).addmm_(s1, v1b, 1, 2).addmm_(p, v2b);  // P2 v + 2 P1 v1 + P v2
          }
        }
      });
    });
  }
  return {o.view(q.sizes()), o1.view(q1.sizes()), o2.view(q1.sizes())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fasthess, m) {
  m.def(
      "attention_jet2(Tensor q, Tensor k, Tensor v, Tensor q1, Tensor k1, Tensor v1, Tensor q2, Tensor k2, "
      "Tensor v2, Tensor? keep, bool causal, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fasthess, CPU, m) { m.impl("attention_jet2", &attention_jet2_cpu); }

}  // namespace fasthess
