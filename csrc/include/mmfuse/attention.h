// Flash-style attention over packed (varlen) sequences, forward and backward.
//   q [Tq, Hq, D], k/v [Tk, Hk, D] (row-major, contiguous), Hq a multiple of Hk (GQA).
//   Sequence b holds query rows cu_seqlens_q[b] .. cu_seqlens_q[b+1] and key rows likewise.
//   Query i (0-based in its sequence, Lq rows) sees key j (Lk rows) when
//     lo(i) <= j <= hi(i),  off = Lk - Lq (bottom-right alignment, as flash-attn >= 2.1),
//     lo(i) = window_left  < 0 ? 0      : i + off - window_left,
//     hi(i) = window_right < 0 ? Lk - 1 : i + off + window_right   (causal: window_right = 0).
//   out = softmax(scale * q k^T) v per query head; lse [Hq, Tq] = logsumexp of the scaled scores.
//   A query row that sees no key gets out = 0 and lse = -inf (so that merging it is a no-op).
// Math in fp32 (fp64 for fp64 inputs); lse is stored in that math type.
#pragma once
#include <cstdint>

#include "mmfuse/dtype.h"

namespace mmfuse {

struct AttentionShape {
  const int32_t* cu_seqlens_q = nullptr;  // [batch + 1], 0 .. total_q, non-decreasing
  const int32_t* cu_seqlens_k = nullptr;  // [batch + 1], 0 .. total_k, non-decreasing
  int64_t batch = 0;
  int64_t total_q = 0, total_k = 0;
  int64_t heads_q = 0, heads_k = 0, dim = 0;  // dim <= 256
  double scale = 1.0;
  bool causal = false;
  int64_t window_left = -1, window_right = -1;  // -1: unbounded
  DType dtype = DType::f32;                     // of q, k, v, out, dout, dq, dk, dv
  int num_threads = 0;                          // <= 0: default_num_threads()
};

struct AttentionFwdArgs : AttentionShape {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;  // [total_q, heads_q, dim]
  void* lse = nullptr;  // [heads_q, total_q], fp32 (fp64 for fp64)
};

struct AttentionBwdArgs : AttentionShape {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* out = nullptr;   // the forward's output
  const void* lse = nullptr;   // the forward's lse
  const void* dout = nullptr;  // [total_q, heads_q, dim]
  const void* dlse = nullptr;  // optional [heads_q, total_q] (lse's math type): gradient of lse
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
};

void attention_fwd(const AttentionFwdArgs& args);
void attention_bwd(const AttentionBwdArgs& args);

}  // namespace mmfuse
