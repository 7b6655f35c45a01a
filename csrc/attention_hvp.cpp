// Attention HVP on the CPU: the attention backward (dq, dk, dv) and its tangents along N tangent
// sets (q1, k1, v1, dout1). Spec: fasthess/kernels/attention_hvp/reference.py; the formulas are in
// fasthess/kernels/attention_hvp/blocked.py.
//
// Work item = (batch·head, group of tangents), spread over threads by fasthess::parallel_for
// (parallel.h): dk, dv and their tangents accumulate over query blocks, so one item owns every
// query block of its head and no two items write the same output (no races, no atomics). Tangents
// are split into groups only when there are fewer heads than threads; within an item P = softmax(S)
// of each block of BM query rows (BM × Tk, never T × T) is computed once and shared by the item's
// tangents. Products go to at::mm/addmm (BLAS, single-threaded inside the parallel region); the
// softmax-jet and backward statistics are fused loops over each row.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include "parallel.h"
#include <torch/library.h>

#include "attention_softmax.h"
#include "jet2_checks.h"

#include <algorithm>
#include <tuple>

namespace fasthess {
namespace {

constexpr int64_t kBlockRows = 64;

// Primal backward statistics of a block: ds = P ∘ (dP − D) with D = rowsum(P ∘ dP); d gets D.
template <typename scalar_t>
void backward_rows(const scalar_t* p, const scalar_t* dp, scalar_t* ds, scalar_t* d, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* pr = p + i * cols;
    const scalar_t* g = dp + i * cols;
    scalar_t acc = 0;
    for (int64_t j = 0; j < cols; ++j) acc += pr[j] * g[j];
    d[i] = acc;
    for (int64_t j = 0; j < cols; ++j) ds[i * cols + j] = pr[j] * (g[j] - acc);
  }
}

// Tangent statistics of a block, in place: s1 (S1) -> P1 = P ∘ (S1 − rowsum(P ∘ S1)) and
// dp1 (dP1) -> dS1 = P1 ∘ (dP − D) + P ∘ (dP1 − D1) with D1 = rowsum(P1 ∘ dP + P ∘ dP1).
template <typename scalar_t>
void tangent_rows(const scalar_t* p, const scalar_t* dp, const scalar_t* d, scalar_t* s1, scalar_t* dp1,
                  int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* pr = p + i * cols;
    const scalar_t* g = dp + i * cols;
    scalar_t* a = s1 + i * cols;
    scalar_t* b = dp1 + i * cols;
    scalar_t mu = 0;
    for (int64_t j = 0; j < cols; ++j) mu += pr[j] * a[j];
    scalar_t d1 = 0;
    for (int64_t j = 0; j < cols; ++j) {
      a[j] = pr[j] * (a[j] - mu);
      d1 += a[j] * g[j] + pr[j] * b[j];
    }
    for (int64_t j = 0; j < cols; ++j) b[j] = a[j] * (g[j] - d[i]) + pr[j] * (b[j] - d1);
  }
}

using Six = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Six attention_hvp_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
                      const at::Tensor& q1, const at::Tensor& k1, const at::Tensor& v1, const at::Tensor& dout1,
                      const c10::optional<at::Tensor>& keep_opt, bool causal, double scale) {
  // the op has no autograd formula (its derivative rules live in Python): never record the inner products,
  // even when called on tensors that require grad (inside torch.autograd.Function.forward of a model's loss)
  at::NoGradGuard no_grad;
  check_attention_hvp_inputs(q, k, v, dout, q1, k1, v1, dout1, keep_opt);
  const int64_t n = q1.size(0);
  const int64_t B = q.size(0), H = q.size(1), TQ = q.size(2), D = q.size(3), TK = k.size(2), BH = B * H;
  at::Tensor keep;
  if (keep_opt.has_value()) {
    keep = keep_opt->to(at::kBool).contiguous();
  }
  auto q3 = q.contiguous().view({BH, TQ, D}), do3 = dout.contiguous().view({BH, TQ, D});
  auto k3 = k.contiguous().view({BH, TK, D}), v3 = v.contiguous().view({BH, TK, D});
  auto q1c = q1.contiguous().view({n, BH, TQ, D}), do1c = dout1.contiguous().view({n, BH, TQ, D});
  auto k1c = k1.contiguous().view({n, BH, TK, D}), v1c = v1.contiguous().view({n, BH, TK, D});
  auto dq = at::zeros({BH, TQ, D}, q.options()), dk = at::zeros({BH, TK, D}, q.options());
  auto dv = at::zeros({BH, TK, D}, q.options());
  auto dq1 = at::zeros({n, BH, TQ, D}, q.options()), dk1 = at::zeros({n, BH, TK, D}, q.options());
  auto dv1 = at::zeros({n, BH, TK, D}, q.options());
  // tangent groups: enough items to keep every thread busy when B·H is small
  const int64_t threads = at::get_num_threads();
  const int64_t groups = std::max<int64_t>(1, std::min<int64_t>(n, (threads + BH - 1) / BH));
  if (TQ > 0 && TK > 0) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_hvp_cpu", [&] {
      fasthess::parallel_for(0, BH * groups, 1, [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t bh = item / groups, g = item % groups;
          const int64_t t0 = g * n / groups, t1 = (g + 1) * n / groups;
          const bool* kp = keep.defined() ? keep.data_ptr<bool>() + (bh / H) * TK : nullptr;
          auto rowstat = at::empty({kBlockRows}, q.options());
          for (int64_t i0 = 0; i0 < TQ; i0 += kBlockRows) {
            const int64_t rows = std::min(kBlockRows, TQ - i0);
            const int64_t cols = causal ? std::min(TK, i0 + rows) : TK;  // later keys are masked for every row
            if (cols <= 0) continue;  // causal rows past Tk: nothing visible, gradients stay 0
            auto qb = q3[bh].narrow(0, i0, rows), dob = do3[bh].narrow(0, i0, rows);
            auto kc = k3[bh].narrow(0, 0, cols), vc = v3[bh].narrow(0, 0, cols);
            auto p = at::mm(qb, kc.t()).mul_(scale);
            masked_softmax_rows<scalar_t>(p.data_ptr<scalar_t>(), rows, cols, i0, causal, kp);
            auto dp = at::mm(dob, vc.t());
            auto ds = at::empty_like(dp);
            scalar_t* dvec = rowstat.data_ptr<scalar_t>();
            backward_rows<scalar_t>(p.data_ptr<scalar_t>(), dp.data_ptr<scalar_t>(), ds.data_ptr<scalar_t>(), dvec,
                                    rows, cols);
            if (g == 0) {  // the primal backward, once per head
              dv[bh].narrow(0, 0, cols).addmm_(p.t(), dob);
              at::Tensor dqb = dq[bh].narrow(0, i0, rows);
              at::mm_out(dqb, ds, kc).mul_(scale);
              dk[bh].narrow(0, 0, cols).addmm_(ds.t(), qb, 1, scale);
            }
            for (int64_t t = t0; t < t1; ++t) {
              auto q1b = q1c[t][bh].narrow(0, i0, rows), do1b = do1c[t][bh].narrow(0, i0, rows);
              auto k1b = k1c[t][bh].narrow(0, 0, cols), v1b = v1c[t][bh].narrow(0, 0, cols);
              auto p1 = at::mm(q1b, kc.t()).addmm_(qb, k1b.t()).mul_(scale);  // S1, then P1 in place
              auto ds1 = at::mm(do1b, vc.t()).addmm_(dob, v1b.t());          // dP1, then dS1 in place
              tangent_rows<scalar_t>(p.data_ptr<scalar_t>(), dp.data_ptr<scalar_t>(), dvec, p1.data_ptr<scalar_t>(),
                                     ds1.data_ptr<scalar_t>(), rows, cols);
              dv1[t][bh].narrow(0, 0, cols).addmm_(p1.t(), dob).addmm_(p.t(), do1b);
              at::Tensor dq1b = dq1[t][bh].narrow(0, i0, rows);
              at::mm_out(dq1b, ds1, kc).addmm_(ds, k1b).mul_(scale);
              dk1[t][bh].narrow(0, 0, cols).addmm_(ds1.t(), qb, 1, scale).addmm_(ds.t(), q1b, 1, scale);
            }
          }
        }
      });
    });
  }
  return {dq.view(q.sizes()), dk.view(k.sizes()), dv.view(v.sizes()),
          dq1.view(q1.sizes()), dk1.view(k1.sizes()), dv1.view(v1.sizes())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fasthess, m) {
  m.def(
      "attention_hvp(Tensor q, Tensor k, Tensor v, Tensor dout, Tensor q1, Tensor k1, Tensor v1, Tensor dout1, "
      "Tensor? keep, bool causal, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fasthess, CPU, m) { m.impl("attention_hvp", &attention_hvp_cpu); }

}  // namespace fasthess
