// The program that runs a launcher of csrc/cuda/*.cu under the CPU emulation (cuda_runtime.h): driver IN OUT.
// IN (little-endian int64 unless said): the entry's name length and name (shims.cpp), the number of buffers,
// each as its byte count (-1: nullptr) and bytes, the number of integer arguments and them, the number of
// float64 arguments and them. OUT: the bytes of every buffer after the call, in order. Each buffer is its own
// heap block of exactly its size, so AddressSanitizer sees an access one element past it.
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include <cuda_runtime.h>

int main(int argc, char** argv) {
  if (argc != 3) return 1;
  std::ifstream in(argv[1], std::ios::binary);
  auto i64 = [&] {
    int64_t v = 0;
    in.read(reinterpret_cast<char*>(&v), sizeof v);
    return v;
  };
  std::string name(i64(), '\0');
  in.read(name.data(), name.size());
  std::vector<std::unique_ptr<char[]>> bufs(i64());
  std::vector<int64_t> sizes(bufs.size());
  std::vector<void*> ptrs(bufs.size(), nullptr);
  for (size_t j = 0; j < bufs.size(); ++j) {
    sizes[j] = i64();
    if (sizes[j] < 0) continue;
    bufs[j].reset(new char[sizes[j]]);
    in.read(bufs[j].get(), sizes[j]);
    ptrs[j] = bufs[j].get();
  }
  std::vector<int64_t> ints(i64() + 1);
  for (size_t j = 0; j + 1 < ints.size(); ++j) ints[j] = i64();
  std::vector<double> floats(i64() + 1);
  in.read(reinterpret_cast<char*>(floats.data()), (floats.size() - 1) * sizeof(double));
  if (!in) return 2;
  const auto entry = fasthess_emu::entries().find(name);
  if (entry == fasthess_emu::entries().end()) {
    std::fprintf(stderr, "no entry %s in this build\n", name.c_str());
    return 3;
  }
  const int err = entry->second(ptrs.data(), ints.data(), floats.data());
  if (err != 0) {
    std::fprintf(stderr, "%s returned cudaError_t %d\n", name.c_str(), err);
    return 4;
  }
  std::ofstream out(argv[2], std::ios::binary);
  for (size_t j = 0; j < bufs.size(); ++j)
    if (sizes[j] > 0) out.write(bufs[j].get(), sizes[j]);
  return out ? 0 : 5;
}
