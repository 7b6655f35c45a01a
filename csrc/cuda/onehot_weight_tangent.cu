// One-hot weight tangents x E_kᵀ on the GPU, written straight into the output (no (K, out, in) seed, no
// matmul, no separate zero fill): the output is K·M rows of out_features entries; a block of 32 x 8 threads
// takes 8 rows at a time (grid-stride), row r = k M + m (one division per row, not per entry), reads
// rows[k], cols[k] and x[m, cols[k]] once, and its 32 lanes write the row (coalesced): the value at
// column rows[k], zeros elsewhere. Entries are copied as raw bits (U: an unsigned integer of the width of
// the element type), so one instantiation per width serves every floating type.
#include "onehot_weight_tangent.h"

namespace fasthess_cuda {
namespace {

constexpr int kLanes = 32;        // threads along a row
constexpr int kRowsPerBlock = 8;  // rows per block and step
constexpr int64_t kMaxBlocks = 65535;

template <typename U>
__global__ void __launch_bounds__(kLanes * kRowsPerBlock)
    onehot_weight_tangent_kernel(const U* __restrict__ x, const int64_t* __restrict__ rows,
                                 const int64_t* __restrict__ cols, U* __restrict__ out, int64_t K, int64_t M,
                                 int64_t in, int64_t out_features) {
  const int64_t total = K * M;
  for (int64_t r = (int64_t)blockIdx.x * kRowsPerBlock + threadIdx.y; r < total;
       r += (int64_t)gridDim.x * kRowsPerBlock) {
    const int64_t k = r / M, m = r - k * M;
    const int64_t row = rows[k];  // < 0: a zero direction, matches no column
    const U v = row >= 0 ? x[m * in + cols[k]] : U(0);
    U* dst = out + r * out_features;
    for (int64_t o = threadIdx.x; o < out_features; o += kLanes) dst[o] = o == row ? v : U(0);
  }
}

template <typename U>
cudaError_t launch(const void* x, const int64_t* rows, const int64_t* cols, void* out, int64_t K, int64_t M,
                   int64_t in, int64_t out_features, cudaStream_t stream) {
  const int64_t b = (K * M + kRowsPerBlock - 1) / kRowsPerBlock;
  const dim3 block(kLanes, kRowsPerBlock);
  onehot_weight_tangent_kernel<U><<<(unsigned)(b < kMaxBlocks ? b : kMaxBlocks), block, 0, stream>>>(
      static_cast<const U*>(x), rows, cols, static_cast<U*>(out), K, M, in, out_features);
  return cudaGetLastError();
}

}  // namespace

cudaError_t onehot_weight_tangent(const void* x, const int64_t* rows, const int64_t* cols, void* out, int64_t K,
                                  int64_t M, int64_t in, int64_t out_features, int elem_size, cudaStream_t stream) {
  if (K < 0 || M < 0 || in < 0 || out_features < 0) return cudaErrorInvalidValue;
  if (K == 0 || M == 0 || out_features == 0) return cudaSuccess;
  switch (elem_size) {
    case 2:
      return launch<uint16_t>(x, rows, cols, out, K, M, in, out_features, stream);
    case 4:
      return launch<uint32_t>(x, rows, cols, out, K, M, in, out_features, stream);
    case 8:
      return launch<uint64_t>(x, rows, cols, out, K, M, in, out_features, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace fasthess_cuda
