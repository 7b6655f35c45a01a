// fasthess::parallel_for: at::parallel_for whose workers run in the caller's thread-local state.
//
// Grad mode, inference mode and the dispatcher's excluded keys (an op called through the dispatcher
// runs below autograd) are thread-local, and an OpenMP worker thread of at::parallel_for starts with
// its own: grad mode on, autograd keys active. With one thread the loop runs on the caller's thread and
// sees the caller's state; with more, a worker that calls ATen (mm_out, addmm_) on inputs that require
// grad fails ("functions with out=... arguments don't support automatic differentiation") or records
// a graph, and one that writes into an inference tensor fails outside inference mode. Running each
// chunk under the caller's state makes an op behave the same at any thread count. Every op in csrc/
// uses this one, never at::parallel_for (tests/test_cpp_ops.py checks both).
#pragma once
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <cstdint>

namespace fasthess {

template <class F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain_size, const F& f) {
  const at::ThreadLocalState caller;
  at::parallel_for(begin, end, grain_size, [&](int64_t chunk_begin, int64_t chunk_end) {
    at::ThreadLocalStateGuard guard(caller);
    f(chunk_begin, chunk_end);
  });
}

}  // namespace fasthess
