// RMSNorm and fused residual-add + RMSNorm (Hugging Face Qwen2RMSNorm rounding order).
//   y = weight * round_x(x * rstd),   rstd = 1 / sqrt(mean(x^2) + eps)   (fp32 math)
// With `residual`: s = round_x(x + residual) is written to `sum` and normalised instead of x.
// Tensors are row-major [rows, dim] and contiguous.
#pragma once
#include <cstdint>

#include "mmfuse/dtype.h"

namespace mmfuse {

struct RmsNormFwdArgs {
  const void* x = nullptr;         // [rows, dim], x_dtype
  const void* residual = nullptr;  // optional [rows, dim], x_dtype (add_rms_norm)
  const void* weight = nullptr;    // [dim], w_dtype (== x_dtype or f32)
  void* y = nullptr;               // [rows, dim], y_dtype = promote(x_dtype, w_dtype)
  void* sum = nullptr;             // [rows, dim], x_dtype; required when residual is set
  void* rstd = nullptr;            // optional [rows], fp32 (fp64 when x is fp64)
  int64_t rows = 0, dim = 0;
  DType x_dtype = DType::f32, w_dtype = DType::f32, y_dtype = DType::f32;
  double eps = 1e-6;
  int num_threads = 0;             // <= 0: default_num_threads()
};

struct RmsNormBwdArgs {
  const void* dy = nullptr;        // [rows, dim], y_dtype
  const void* x = nullptr;         // [rows, dim], x_dtype: the normalised input (the sum for add_rms_norm)
  const void* weight = nullptr;    // [dim], w_dtype
  const void* rstd = nullptr;      // optional [rows] from the forward, fp32 (fp64 when x is fp64);
                                   // nullptr: recomputed from the row already in cache (costs no extra bytes)
  double eps = 1e-6;               // used when rstd is recomputed
  const void* dsum = nullptr;      // optional [rows, dim], x_dtype: gradient of the `sum` output
  void* dx = nullptr;              // [rows, dim], x_dtype
  void* dw = nullptr;              // [dim], w_dtype, overwritten; accumulated in fp32 (fp64 for fp64)
  int64_t rows = 0, dim = 0;
  DType x_dtype = DType::f32, w_dtype = DType::f32, y_dtype = DType::f32;
  int num_threads = 0;
};

void rms_norm_fwd(const RmsNormFwdArgs& args);
void rms_norm_bwd(const RmsNormBwdArgs& args);

}  // namespace mmfuse
