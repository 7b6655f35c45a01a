// The counter-based hash that regenerates Hutchinson probes from (seed, probe index, coordinate), shared by
// the CPU kernel (csrc/linear_ops.cpp) and the CUDA kernel (csrc/cuda/hutchinson_update.cu); the torch
// reference (fasthess/kernels/linear/reference.py: hash32, rademacher) and the Triton kernel are its twins.
// Plain C++ (no torch headers): nvcc compiles it for the device too. One definition, so a probe drawn on
// one backend is bit-identical on every other.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define FASTHESS_HOST_DEVICE __host__ __device__
#else
#define FASTHESS_HOST_DEVICE
#endif

namespace fasthess_hash {

// Wellons' lowbias32.
FASTHESS_HOST_DEVICE inline uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// Key of probe p of seed s: hash32(hash32(s mod 2^32) + p) (mod 2^32), with seed_hash = hash32(s mod 2^32).
FASTHESS_HOST_DEVICE inline uint32_t probe_key(uint32_t seed_hash, int64_t probe) {
  return hash32(seed_hash + static_cast<uint32_t>(probe));
}

// Sign bit of coordinate i of the probe with key `key`: 1 means -1, 0 means +1 (z = 1 - 2 bit).
FASTHESS_HOST_DEVICE inline uint32_t probe_sign_bit(uint32_t key, int64_t i) {
  return hash32(key ^ static_cast<uint32_t>(i)) >> 31;
}

}  // namespace fasthess_hash
