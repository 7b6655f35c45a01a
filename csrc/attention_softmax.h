// Masked row softmax shared by the CPU attention kernels (attention_jet2.cpp, attention_hvp.cpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace fasthess {

// In place: s (rows × cols, query rows start at row0) -> masked softmax P; an empty row becomes 0.
// causal: key j visible to query i when j <= i; keep (may be null): cols flags, false = padding.
template <typename scalar_t>
inline void masked_softmax_rows(scalar_t* s, int64_t rows, int64_t cols, int64_t row0, bool causal, const bool* keep) {
  for (int64_t i = 0; i < rows; ++i) {
    scalar_t* r = s + i * cols;
    const int64_t last = causal ? std::min<int64_t>(cols, row0 + i + 1) : cols;  // keys [0, last) may be visible
    scalar_t mx = -std::numeric_limits<scalar_t>::infinity();
    for (int64_t j = 0; j < last; ++j)
      if (keep == nullptr || keep[j]) mx = std::max(mx, r[j]);
    if (mx == -std::numeric_limits<scalar_t>::infinity()) {
      std::fill(r, r + cols, scalar_t(0));
      continue;
    }
    scalar_t sum = 0;
    for (int64_t j = 0; j < cols; ++j) {
      const bool vis = j < last && (keep == nullptr || keep[j]);
      r[j] = vis ? std::exp(r[j] - mx) : scalar_t(0);
      sum += r[j];
    }
    const scalar_t inv = scalar_t(1) / sum;
    for (int64_t j = 0; j < cols; ++j) r[j] *= inv;
  }
}

}  // namespace fasthess
