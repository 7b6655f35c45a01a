// Runs csrc/cuda/attention_hvp.cu on the CPU through the stand-in runtime (cuda_runtime.h here), for
// tests/test_kernels_attention_hvp.py:   run_attention_hvp IN OUT
// IN: int64 {element bytes (4 or 8), B, H, Tq, Tk, D, N, causal, has_keep}, float64 scale, then q, k, v, dout,
// q1, k1, v1, dout1 as T, then keep (B·Tk bytes) if has_keep. OUT: dq, dk, dv, dq1, dk1, dv1 as T.
// Every array is its own heap block (AddressSanitizer sees overruns); the workspace starts as NaN.
#include <cstdio>
#include <fstream>
#include <limits>
#include <vector>

#include "../../csrc/cuda/attention_hvp.cu"

namespace fasthess_cuda {
namespace {
alignas(16) unsigned char smem_raw[fasthess_emu::kSharedBytes];  // the kernels' extern __shared__ buffer
}  // namespace
}  // namespace fasthess_cuda

template <typename T>
int run(std::ifstream& in, std::ofstream& out, const int64_t* h, double scale) {
  const int64_t B = h[1], H = h[2], TQ = h[3], TK = h[4], D = h[5], N = h[6];
  const int64_t nq = B * H * TQ * D, nk = B * H * TK * D;
  const int64_t sizes[8] = {nq, nk, nk, nq, N * nq, N * nk, N * nk, N * nq};
  std::vector<std::vector<T>> x(8);
  for (int i = 0; i < 8; ++i) {
    x[i].resize(sizes[i]);
    in.read(reinterpret_cast<char*>(x[i].data()), sizes[i] * sizeof(T));
  }
  std::vector<uint8_t> keep(h[8] ? B * TK : 0);
  in.read(reinterpret_cast<char*>(keep.data()), keep.size());
  if (!in) return 2;
  const int64_t osizes[6] = {nq, nk, nk, N * nq, N * nk, N * nk};
  std::vector<std::vector<T>> o(6);
  for (int i = 0; i < 6; ++i) o[i].assign(osizes[i], T(0));
  std::vector<T> ws(fasthess_cuda::attention_hvp_workspace_elems(B, H, TQ, N), std::numeric_limits<T>::quiet_NaN());
  fasthess_emu::shared = fasthess_cuda::smem_raw;
  const cudaError_t err = fasthess_cuda::attention_hvp<T>(
      x[0].data(), x[1].data(), x[2].data(), x[3].data(), x[4].data(), x[5].data(), x[6].data(), x[7].data(),
      h[8] ? keep.data() : nullptr, o[0].data(), o[1].data(), o[2].data(), o[3].data(), o[4].data(), o[5].data(),
      ws.data(), B, H, TQ, TK, D, N, (T)scale, h[7] != 0, nullptr);
  if (err != cudaSuccess) {
    std::fprintf(stderr, "attention_hvp returned %d\n", (int)err);
    return 3;
  }
  for (auto& t : o) out.write(reinterpret_cast<const char*>(t.data()), t.size() * sizeof(T));
  return out ? 0 : 4;
}

int main(int argc, char** argv) {
  if (argc != 3) return 1;
  std::ifstream in(argv[1], std::ios::binary);
  std::ofstream out(argv[2], std::ios::binary);
  int64_t h[9];
  double scale;
  in.read(reinterpret_cast<char*>(h), sizeof h);
  in.read(reinterpret_cast<char*>(&scale), sizeof scale);
  if (!in) return 2;
  return h[0] == 4 ? run<float>(in, out, h, scale) : run<double>(in, out, h, scale);
}
