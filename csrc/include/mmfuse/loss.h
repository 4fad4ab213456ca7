// Softmax cross-entropy over rows of logits (the class dimension is the last, contiguous one).
//   lse_i  = log(sum_j exp(x_ij))                      (fp32 math; fp64 for fp64)
//   loss_i = lse_i - x_i,label_i, 0 where label_i == ignore_index
//   grad_ij = (exp(x_ij - lse_i) - [j == label_i]) * grad_scale * row_scale_i, 0 on ignored rows
// One call can compute the loss, the lse and the gradient in one sweep over each row; the gradient
// may overwrite the logits (grad == logits), which is how linear cross-entropy avoids a second
// [rows, vocab] buffer. Labels are validated by the caller; a label outside [0, vocab) that is not
// ignore_index gives a NaN loss and no target term in the gradient.
#pragma once
#include <cstdint>

#include "mmfuse/dtype.h"

namespace mmfuse {

struct CrossEntropyArgs {
  const void* logits = nullptr;   // [rows, vocab] dtype, rows `logits_row_stride` elements apart
  int64_t logits_row_stride = 0;
  const int64_t* labels = nullptr;  // [rows]
  const void* lse_in = nullptr;   // optional [rows] math type: the lse of a previous call (skips its pass)
  void* loss = nullptr;           // optional [rows] math type (fp32; fp64 for fp64)
  void* lse = nullptr;            // optional [rows] math type
  void* grad = nullptr;           // optional [rows, vocab] dtype; may equal logits (then in place)
  int64_t grad_row_stride = 0;
  double grad_scale = 1.0;
  const void* row_scale = nullptr;  // optional [rows] math type, multiplies grad_scale per row
  int64_t rows = 0, vocab = 0, ignore_index = -100;
  DType dtype = DType::f32;
  int num_threads = 0;            // <= 0: default_num_threads()
};

void cross_entropy(const CrossEntropyArgs& args);

}  // namespace mmfuse
