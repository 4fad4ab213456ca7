// SwiGLU: out = silu(gate) * up, fp32 math, one rounding. The packed form reads [gate | up] halves
// of one row, which is expressed with row strides (gate = x, up = x + cols, stride = 2 * cols).
#pragma once
#include <cstdint>

#include "mmfuse/dtype.h"

namespace mmfuse {

struct SwigluFwdArgs {
  const void* gate = nullptr; int64_t gate_row_stride = 0;  // [rows, cols] (elements between rows)
  const void* up = nullptr;   int64_t up_row_stride = 0;
  void* out = nullptr;        int64_t out_row_stride = 0;
  int64_t rows = 0, cols = 0;
  DType dtype = DType::f32;
  int num_threads = 0;
};

// dgate = dout * up * silu'(gate), dup = dout * silu(gate); silu recomputed from gate.
struct SwigluBwdArgs {
  const void* dout = nullptr; int64_t dout_row_stride = 0;
  const void* gate = nullptr; int64_t gate_row_stride = 0;
  const void* up = nullptr;   int64_t up_row_stride = 0;
  void* dgate = nullptr;      int64_t dgate_row_stride = 0;
  void* dup = nullptr;        int64_t dup_row_stride = 0;
  int64_t rows = 0, cols = 0;
  DType dtype = DType::f32;
  int num_threads = 0;
};

void swiglu_fwd(const SwigluFwdArgs& args);
void swiglu_bwd(const SwigluBwdArgs& args);

}  // namespace mmfuse
