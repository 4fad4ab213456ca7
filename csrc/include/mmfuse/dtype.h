// Element types the C++ core understands. Math is done in fp32 (fp64 for fp64 inputs).
#pragma once
#include <cstddef>
#include <cstdint>

namespace mmfuse {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, f64 = 3 };

inline std::size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f16: return 2;
    case DType::bf16: return 2;
    case DType::f64: return 8;
  }
  return 0;
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::f64: return "float64";
  }
  return "unknown";
}

}  // namespace mmfuse
