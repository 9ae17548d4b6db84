// Shared helpers of the C++ CPU and CUDA backends.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define ILORA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ILORA_HOST_DEVICE inline
#endif

namespace ilora {

// Counter-based dropout, bit-identical to ilora_kernels/_dropout.py (see the derivation there).
ILORA_HOST_DEVICE uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

ILORA_HOST_DEVICE uint32_t dropout_row_key(uint32_t seed, int64_t row) {
  return fmix32(static_cast<uint32_t>(row) * 0x9E3779B9u + seed);
}

ILORA_HOST_DEVICE bool dropout_keep(uint32_t row_key, int64_t col, uint32_t threshold) {
  return (fmix32(row_key ^ (static_cast<uint32_t>(col) * 0x85EBCA77u)) >> 8) >= threshold;
}

inline uint32_t dropout_threshold(double p) { return static_cast<uint32_t>(p * 16777216.0); }

}  // namespace ilora
