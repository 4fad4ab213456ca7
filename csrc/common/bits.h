// Bit casts between floating-point values and their IEEE bit patterns. Kernels that must
// vectorise do their selects and clamps on the bits: GCC does not if-convert float compares under
// -ftrapping-math, and a branch stops a loop from vectorising.
#pragma once
#include <cstdint>
#include <cstring>

#ifndef MMFUSE_ISA_NS
#error "common/bits.h belongs to kernel sources compiled per ISA (MMFUSE_ISA_NS)"
#endif

namespace mmfuse {
namespace MMFUSE_ISA_NS {

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint64_t double_to_bits(double d) {
  uint64_t u;
  std::memcpy(&u, &d, 8);
  return u;
}

}  // namespace MMFUSE_ISA_NS
}  // namespace mmfuse
