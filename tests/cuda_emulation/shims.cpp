// Uniform entry points of the launchers of csrc/cuda/*.cu for the CPU emulation (cuda_runtime.h here):
// int entry(void** buf, const int64_t* i, const double* f) in the order the launcher takes them, i[0] the
// element size in bytes (4: float, 8: double) where the launcher is a template. Compiled once per .cu, after
// the rewritten .cu itself (emulator.py: g++ -include <rewritten .cu> -DFASTHESS_EMU_<stem> shims.cpp), so
// each entry registers itself by name (fasthess_emu::entries) in the object of its own kernel file.
#include <cuda_runtime.h>

#define FASTHESS_EMU_TYPED(NAME, CALL)                          \
  template <typename T>                                         \
  int NAME##_t(void** b, const int64_t* i, const double* f) {   \
    (void)f;                                                    \
    return (int)(CALL);                                         \
  }                                                             \
  int NAME(void** b, const int64_t* i, const double* f) {       \
    return i[0] == 4 ? NAME##_t<float>(b, i, f) : NAME##_t<double>(b, i, f); \
  }                                                             \
  const bool NAME##_registered = (fasthess_emu::entries()[#NAME] = &NAME, true);

#define P(j) static_cast<T*>(b[j])
#define B8(j) static_cast<uint8_t*>(b[j])
#define I64(j) static_cast<int64_t*>(b[j])

namespace {
#if defined(FASTHESS_EMU_gelu_jet2)
FASTHESS_EMU_TYPED(gelu_jet2, fasthess_cuda::gelu_jet2<T>(P(0), P(1), P(2), P(3), P(4), P(5), i[1], i[2], i[3] != 0,
                                                          nullptr))
#endif
#if defined(FASTHESS_EMU_layer_norm_jet2)
FASTHESS_EMU_TYPED(layer_norm_jet2, fasthess_cuda::layer_norm_jet2<T>(P(0), P(1), P(2), P(3), P(4), P(5), P(6), P(7),
                                                                      i[1], i[2], i[3], f[0], nullptr))
#endif
#if defined(FASTHESS_EMU_cross_entropy_jet2)
FASTHESS_EMU_TYPED(cross_entropy_jet2_rows,
                   fasthess_cuda::cross_entropy_jet2_rows<T>(P(0), I64(1), P(2), P(3), P(4), P(5), P(6), i[1], i[2],
                                                             i[3], i[4], nullptr))
#endif
#if defined(FASTHESS_EMU_hutchinson_update)
FASTHESS_EMU_TYPED(hutchinson_update,
                   fasthess_cuda::hutchinson_update<T>(P(0), P(1), P(2), P(3), i[1], i[2], i[3], nullptr))
FASTHESS_EMU_TYPED(hutchinson_update_seeded,
                   fasthess_cuda::hutchinson_update_seeded<T>(P(0), P(1), P(2), i[1], i[2], (uint32_t)i[3], i[4], i[5],
                                                              nullptr))
#endif
#if defined(FASTHESS_EMU_onehot_weight_tangent)
int onehot_weight_tangent(void** b, const int64_t* i, const double*) {
  return (int)fasthess_cuda::onehot_weight_tangent(b[0], I64(1), I64(2), b[3], i[0], i[1], i[2], i[3], (int)i[4],
                                                   nullptr);
}
const bool onehot_registered = (fasthess_emu::entries()["onehot_weight_tangent"] = &onehot_weight_tangent, true);
#endif
#if defined(FASTHESS_EMU_attention_jet2)
FASTHESS_EMU_TYPED(attention_jet2,
                   fasthess_cuda::attention_jet2<T>(P(0), P(1), P(2), P(3), P(4), P(5), P(6), P(7), P(8), B8(9),
                                                    P(10), P(11), P(12), (int)i[1], (int)i[2], (int)i[3], (int)i[4],
                                                    (int)i[5], (int)i[6], (T)f[0], i[7] != 0, nullptr))
#endif
#if defined(FASTHESS_EMU_attention_hvp)
FASTHESS_EMU_TYPED(attention_hvp,
                   fasthess_cuda::attention_hvp<T>(P(0), P(1), P(2), P(3), P(4), P(5), P(6), P(7), B8(8), P(9), P(10),
                                                   P(11), P(12), P(13), P(14), P(15), (int)i[1], (int)i[2], (int)i[3],
                                                   (int)i[4], (int)i[5], (int)i[6], (T)f[0], i[7] != 0, nullptr))
#endif
}  // namespace
