// Rotary position embeddings: plain (cos/sin tables), multimodal M-RoPE (angles computed in the
// kernel from 3 position streams) and the M-RoPE cos/sin table builder. fp32 math.
// Pairing: rotate-half pairs (i, i + dim/2); interleaved pairs (2i, 2i + 1).
// Only the first 2*rot channels rotate (partial rotary); the rest are copied.
// Every output may alias its input (in place); `inverse` rotates by -angle, which is the backward.
#pragma once
#include <cstdint>

#include "mmfuse/dtype.h"

namespace mmfuse {

struct RotaryArgs {
  const void* x = nullptr;    // [tokens, heads, dim], contiguous, dtype
  void* y = nullptr;          // [tokens, heads, dim], dtype (may alias x)
  const void* cos = nullptr;  // [cos_rows, rot], cs_dtype; token t uses row t % cos_rows
  const void* sin = nullptr;  // [cos_rows, rot], cs_dtype
  int64_t tokens = 0, heads = 0, dim = 0, rot = 0, cos_rows = 0;
  DType dtype = DType::f32, cs_dtype = DType::f32;
  bool interleaved = false;
  bool inverse = false;       // rotate by -angle (the backward of the forward rotation)
  int num_threads = 0;
};

// M-RoPE (Qwen2-VL / Qwen2.5-VL): frequency j in [0, dim/2) uses position stream s(j), where the
// frequencies are split into consecutive sections [t, h, w] = sections[0..2]; angle =
// float(position_ids[s(j)][token]) * inv_freq[j] in fp32 (one rounding, as HF computes it), then
// cos/sin in fp32 (libm), computed once per token. Rotate-half pairing over the full head dim.
// q and k in one call; k may be null; all tensors contiguous.
struct MRopeArgs {
  const void* q = nullptr;  void* q_out = nullptr; int64_t q_heads = 0;  // [tokens, q_heads, dim]
  const void* k = nullptr;  void* k_out = nullptr; int64_t k_heads = 0;  // optional, [tokens, k_heads, dim]
  const int64_t* position_ids = nullptr;  // [3, tokens]
  const float* inv_freq = nullptr;        // [dim / 2]
  int64_t tokens = 0, dim = 0;
  int64_t sections[3] = {0, 0, 0};        // sum == dim / 2
  DType dtype = DType::f32;
  bool inverse = false;
  int num_threads = 0;
};

// The M-RoPE tables themselves: cos/sin [tokens, half_dim] of the angles described above.
struct MRopeCosSinArgs {
  const int64_t* position_ids = nullptr;  // [3, tokens]
  const float* inv_freq = nullptr;        // [half_dim]
  float* cos = nullptr;                   // [tokens, half_dim]
  float* sin = nullptr;                   // [tokens, half_dim]
  int64_t tokens = 0, half_dim = 0;
  int64_t sections[3] = {0, 0, 0};
  int num_threads = 0;
};

void rotary(const RotaryArgs& args);
void mrope(const MRopeArgs& args);
void mrope_cos_sin(const MRopeCosSinArgs& args);

}  // namespace mmfuse
