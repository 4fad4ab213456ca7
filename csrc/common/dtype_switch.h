// Map a run-time DType to a storage type for template dispatch.
#pragma once
#include <stdexcept>
#include <string>

#include "common/convert.h"
#include "mmfuse/dtype.h"

namespace mmfuse {
namespace MMFUSE_ISA_NS {

template <typename F>
inline void dispatch_dtype(DType t, const char* what, F&& f) {
  switch (t) {
    case DType::f32: f(float{}); return;
    case DType::f64: f(double{}); return;
    case DType::bf16: f(bf16_t{}); return;
    case DType::f16: f(f16_t{}); return;
  }
  throw std::invalid_argument(std::string(what) + ": unsupported dtype code " + std::to_string(static_cast<int>(t)));
}

}  // namespace MMFUSE_ISA_NS
}  // namespace mmfuse
