// Flash-style attention, forward and backward (compiled once per ISA flavour).
//
// Forward (FlashAttention-2): one work item per (sequence, query head, query tile of kFQ rows), head-major so
// that concurrent items share one head's K/V in cache. K and V of the tiled sequences are packed once per call:
// K^T in kNR-key panels, V in kNR-column panels (math type; read per item out of [T, H, D] instead, every query
// tile re-read its head's rows a page apart, again for each query head of a GQA group). The query tile is copied
// once, times scale * log2(e), so scores are in log2 units; the key/value tiles of kFK keys the mask leaves
// visible are streamed through it with an online softmax per query row on the row-major S = Q K^T: P = 2^(S - m)
// (one vreduceps, a degree-6 polynomial and a masked vscalefps per 16 entries), O += P V. The reference m moves
// only when a tile's maximum exceeds it by more than kLazy (FlashAttention-4's lazy rescaling; exact). Tiles
// the mask hides completely are never visited; on tiles a mask edge crosses, each kNR-key block of S is
// computed only for the query rows that see one of its keys and each 12-row block of P V only over the keys
// its rows see (the causal diagonal's hidden triangle is skipped). out = O / l, lse = ln 2 (m + log2 l).
// The next key tile is prefetched into L2 during the S product. S row-major rather than S^T: P V then reads
// P's rows as sequential streams (160 GFLOP/s on one core against 145 for P^T's strided columns).
//
// Backward recomputes P = exp(S - lse) tile by tile; with Dv_i = rowsum(dO * O)_i - dlse_i:
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - Dv),  dQ = scale dS K,  dK = scale dS^T Q.
// Pass 1: one work item per (sequence, kv head, key tile of kBK rows) accumulates dK and dV over the
// query tiles (kBQ rows) of every query head in its GQA group, and dQ += dS K into a private
// [Hq, Tq, Dp] buffer per thread; the buffers are summed afterwards (5 tile products, the minimum).
// Items go to threads by a fixed rule (largest estimated work first onto the least loaded thread), so the
// dQ sums are bitwise repeatable and causal work is balanced. When those nt buffers would exceed
// kMaxPartialBytes, pass 1 skips dQ and pass 2 (one item per (sequence, query head, query tile))
// accumulates it instead, recomputing S and dP (7 products). Q and dO of the tiled path are copied head-major once
// per call, in the Dv pass (while both copies fit kMaxPartialBytes), so no item reads page-strided rows. P goes
// through the forward's vectorised exp2. The softmax scale is folded into the K^T tile
// once per item. Row buffers have an odd number of vectors per row (512-byte rows put a product's B
// column block in 16 of the 64 L1 sets), and diagonal tiles skip their hidden triangle in all five products.
//
// Short sequences (at most kShortLen query and key rows: Qwen2.5-VL's 64-patch vision windows, say) are
// decomposed differently: one item per (sequence, chunk of kv heads and their query heads) copies the
// sequence's rows token by token (one token's heads are contiguous, so the reads stream) into per-head
// buffers, runs the same tile code per head from there, and writes its outputs token-major. Its backward
// finishes dQ, dK and dV of its rows, so it needs no dQ partials and no Dv pre-pass.
//
// Products go through one register-blocked micro-kernel (gemm_tile): kMR rows x kNR columns of C
// (12 rows x 32 floats with AVX-512, 6 rows x 2 vectors otherwise) live in vector registers over the whole inner
// dimension; the column operand is read as kNR-wide blocks (plain rows or panel-packed), the last one a
// single vector wide where the head dim is an odd number of vectors; head dims are padded to a multiple of
// kVW with zeros. Transposed copies go through kVW x kVW in-register block transposes.
//
// Measured (fp32, 2-core Sapphire Rapids VM, AVX-512, torch 2.13 SDPA = ATen's flash kernel; shared machine,
// load average 1.1-1.8). Dense S 2048, H 16, D 128 through the op, `python -m bench.ops.bench_attention`
// (bench/results/attention-2026-11-28-daf2c19.txt; the A/B below: attention-ab-2026-11-28-62b5b5e.txt), p50 ms,
// ratio to SDPA, % of the fp32 GEMM rate of the same run (298 GFLOP/s; 293-341 in other runs that half hour);
// previous kernel (738a646) ratios in brackets:
//   fwd              147.1 ms  0.97x (0.87x)  78%        causal fwd        78.3 ms  1.16x (0.94x)  74%
//   fwd+bwd          539.1 ms  1.01x (0.91x)  75%        causal fwd+bwd   292.9 ms  1.21x (1.06x)  69%
// Kernel A/B of the previous and this build in one process, interleaved (`python -m bench.ops.ab_attention
// --so BEFORE --so AFTER --cases dense,dense_causal,varlen`), p50 ms before / after:
//                       2 threads           1 thread
//   dense fwd           155.7 / 144.8       318.2 / 281.8
//   dense fwd+bwd       575.5 / 539.4      1121.0 / 1043.1
//   causal fwd           87.6 /  72.0       174.5 / 145.7
//   causal fwd+bwd      327.0 / 275.9       619.2 / 548.8
//   varlen fwd          246.9 / 185.5       510.6 / 385.1     (8 seqs, 8192 tokens, causal, GQA 16/2, D 128)
//   varlen fwd+bwd      962.2 / 773.8      1814.6 / 1491.6
// Varlen through the op (bench/run_all.py --ops attention_varlen): fwd 193.8 ms, 1.42x a Python loop of SDPA
// calls per sequence; fwd+bwd 742.8 ms, 1.62x.
// On a 2-core AMD EPYC (Zen 3, AVX2 flavour), load average 1.6-2.0, against SDPA on contiguous [1, H, S, D] in the
// same process (ab_attention's sdpa_bhsd; bench/results/attention-ab-2026-11-28-286687d.txt): fwd 0.98x, fwd+bwd
// 0.98x (0.81x before the backward's packed Q / dO and vectorised exp), causal fwd 1.21x, causal fwd+bwd 1.33x.
// Vision windows (short path; T = 4096 in 64 windows of 64, H = 16, D = 80) when that path was added, 2 threads,
// load average 1.7: fwd 11.7 ms, fwd+bwd 41.9 ms against one batched SDPA call's 14.4 and 45.6.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

#include "common/convert.h"
#include "common/dtype_switch.h"
#include "common/fast_exp.h"
#include "common/parallel.h"
#include "mmfuse/attention.h"

namespace mmfuse {
namespace MMFUSE_ISA_NS {
namespace {

constexpr int64_t kBQ = 96;   // backward: query rows per tile
constexpr int64_t kBK = 128;  // backward: key rows per tile (a multiple of kNR)
constexpr int64_t kBKp = kBK + 16;  // backward: leading dimension of S, dP, K^T, V^T tiles (see ldr)
constexpr int64_t kFQ = 384;  // forward: query rows per tile (a multiple of kNR)
constexpr int64_t kFK = 224;  // forward: key rows per tile (a multiple of kNR)
constexpr int64_t kMaxPartialBytes = int64_t(512) << 20;  // backward: per-thread dQ buffers, all threads
// Short-sequence path: sequences of at most kShortLen query and key rows are staged (all their heads, or a
// chunk of kv heads whose operands fit kStageBytes). 768 KiB, 3/8 of the 2 MiB L2 this was tuned on, leaves
// room for the streamed inputs: bwd 1 thread on 64 windows of 64 (D 80, 16 heads) 51.8 ms at 1.5 MiB,
// 48.0 at 768 KiB and 512 KiB, 58 at 384 KiB (two heads per item: 640-byte runs per token stream poorly).
// The short path against the tiled one on the same sequences (T = 4096 in windows of W, 2 threads, fwd /
// fwd+bwd ms): W 32, 16 heads of 64: 2.7 / 10.8 vs 3.9 / 17.2; W 128, 16 x 80: 18.6 / 62 vs 21.3 / 80;
// W 256, 16 x 128: 43.0 / 188 vs 44.2 / 196; W 256 causal, GQA 16/2, D 128: 43.1 / 157 vs 48.7 / 171.
constexpr int64_t kShortLen = 256;
constexpr int64_t kStageBytes = int64_t(3) << 18;
// Few-rows path (forward only): sequences of at most kFewRows query rows, a generation step's one new token
// above all, read K and V in place, kFewKeys keys at a time, one item per (sequence, kv head) for all its query
// heads. The tiled path packed the whole cache per call and the short path staged it: 1 query row over 600
// cached keys (8 heads, GQA 8/2, D 64, the 100m preset's decoder) took 0.36 ms, over 2000 keys 4.1 ms (page
// faults of the per-call packing buffers), against 0.17 / 0.44 ms for SDPA.
constexpr int64_t kFewRows = 8;
constexpr int64_t kFewKeys = 256;

#if defined(__AVX512F__)
constexpr int kVW = 16;
#elif defined(__AVX2__)
constexpr int kVW = 8;
#else
constexpr int kVW = 4;  // SSE2 / NEON
#endif
constexpr int kNR = 2 * kVW;  // columns of C per micro-kernel call: two vectors (one for a last, half block)
// Rows of C per micro-kernel call: 2 kMR accumulators + 2 B vectors + 1 broadcast registers (32 with
// AVX-512, 16 otherwise).
constexpr int kMR = kVW == 16 ? 12 : 6;

typedef float vecf __attribute__((vector_size(kVW * sizeof(float))));

inline vecf vload(const float* p) {
  vecf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, vecf v) { std::memcpy(p, &v, sizeof v); }

constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// C[R x NV*kVW] (+)= A[R x K] B[K x NV*kVW]; A's element (r, kk) is at A[r * ars + kk * aks] (so A may be
// read transposed), B rows are ldb apart, C rows ldc apart. The loops over r are unrolled before GCC's scalar
// replacement of the accumulator arrays: left to the later unroller, GCC 13 kept c0/c1 on the stack, zeroing them
// with two `rep stos` and copying them through memory around the K loop on every call (at K = 16, a tiny
// model's head dim, that was most of a call).
template <int R, int NV>
inline void micro_kernel(int64_t K, const float* A, int64_t ars, int64_t aks, const float* B, int64_t ldb,
                         float* C, int64_t ldc, bool accumulate) {
  vecf c0[R], c1[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    c0[r] = accumulate ? vload(C + r * ldc) : vecf{};
    if constexpr (NV == 2) c1[r] = accumulate ? vload(C + r * ldc + kVW) : vecf{};
  }
  for (int64_t kk = 0; kk < K; ++kk) {
    const vecf b0 = vload(B + kk * ldb);
    vecf b1{};
    if constexpr (NV == 2) b1 = vload(B + kk * ldb + kVW);
    const float* a = A + kk * aks;
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
      const float ar = a[r * ars];  // scalar * vector: one broadcast ({1to16} operand with AVX-512)
      c0[r] += ar * b0;
      if constexpr (NV == 2) c1[r] += ar * b1;
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    vstore(C + r * ldc, c0[r]);
    if constexpr (NV == 2) vstore(C + r * ldc + kVW, c1[r]);
  }
}

// micro_kernel<rows, NV> for 1 <= rows <= R.
template <int R, int NV>
inline void micro_kernel_tail(int64_t rows, int64_t K, const float* A, int64_t ars, int64_t aks, const float* B,
                              int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if constexpr (R > 0) {
    if (rows == R)
      micro_kernel<R, NV>(K, A, ars, aks, B, ldb, C, ldc, accumulate);
    else
      micro_kernel_tail<R - 1, NV>(rows, K, A, ars, aks, B, ldb, C, ldc, accumulate);
  }
}

// Cache lines of some contiguous regions (the next key / value tile), prefetched into L2 a few at a time
// between micro-kernel calls of the current tile's products: a burst would stall on the fill buffers.
struct Prefetch {
  const char* p[12];
  int64_t len[12];
  int n = 0, i = 0, per_call = 0;
  int64_t off = 0;
  void add(const void* s, int64_t bytes) {
    if (n < 12 && bytes > 0) {
      p[n] = static_cast<const char*>(s);
      len[n++] = bytes;
    }
  }
  int64_t lines() const {
    int64_t t = 0;
    for (int r = 0; r < n; ++r) t += (len[r] + 63) / 64;
    return t;
  }
  void step() {
    for (int l = 0; l < per_call && i < n; ++l) {
      __builtin_prefetch(p[i] + off, 0, 2);
      if ((off += 64) >= len[i]) {
        ++i;
        off = 0;
      }
    }
  }
};

// The inner range [k0, k1) that rows [m, m + rows) of C need: all of K, or (KBand) the keys the mask leaves
// visible to a block of query rows, so that a tile on the causal diagonal skips its hidden triangle. Only with
// accumulate: rows whose range is empty are left as they are.
struct FullK {
  void operator()(int64_t, int64_t, int64_t K, int64_t& k0, int64_t& k1) const {
    k0 = 0;
    k1 = K;
  }
};

template <int NV, typename KR>
inline void gemm_block(int64_t M, int64_t K, const float* A, int64_t ars, int64_t aks, const float* B, int64_t ldb,
                       float* C, int64_t ldc, bool accumulate, Prefetch* pf, const KR& kr) {
  for (int64_t m = 0; m < M; m += kMR) {
    const int64_t rows = std::min<int64_t>(kMR, M - m);
    int64_t k0, k1;
    kr(m, rows, K, k0, k1);
    if (k1 <= k0) continue;
    if (rows == kMR)
      micro_kernel<kMR, NV>(k1 - k0, A + m * ars + k0 * aks, ars, aks, B + k0 * ldb, ldb, C + m * ldc, ldc, accumulate);
    else
      micro_kernel_tail<kMR - 1, NV>(rows, k1 - k0, A + m * ars + k0 * aks, ars, aks, B + k0 * ldb, ldb, C + m * ldc,
                                     ldc, accumulate);
    if (pf) pf->step();
  }
}

// C[M x N] (+)= A[M x K] B[K x N] with N a multiple of kVW (callers pad B and C with zeros); column blocks are
// kNR wide, the last one kVW wide when N is an odd number of vectors (head dim 80 with AVX-512: 80 columns
// computed, not 96).
// Column block n0 / kNR of B starts bps floats after the previous one (kNR for a plain row-major B;
// panel-packed operands store each kNR-wide block contiguously over K, bps = K * kNR, ldb = kNR).
template <typename M_, typename KR = FullK>
void gemm_tile(int64_t M, int64_t N, int64_t K, const M_* A, int64_t ars, int64_t aks, const M_* B, int64_t ldb,
               M_* C, int64_t ldc, bool accumulate, int64_t bps = kNR, Prefetch* pf = nullptr, const KR& kr = KR()) {
  if constexpr (std::is_same_v<M_, float>) {
    for (int64_t n0 = 0; n0 < N; n0 += kNR, B += bps - kNR) {
      if (N - n0 >= kNR)
        gemm_block<2>(M, K, A, ars, aks, B + n0, ldb, C + n0, ldc, accumulate, pf, kr);
      else
        gemm_block<1>(M, K, A, ars, aks, B + n0, ldb, C + n0, ldc, accumulate, pf, kr);
    }
  } else {  // fp64 (gradcheck only): plain loops
    for (int64_t m = 0; m < M; ++m) {
      M_* c = C + m * ldc;
      if (!accumulate)
        for (int64_t n = 0; n < N; ++n) c[n] = 0;
      int64_t k0, k1;
      kr(m / kMR * kMR, std::min<int64_t>(kMR, M - m / kMR * kMR), K, k0, k1);
      for (int64_t n0 = 0; n0 < N; n0 += kNR) {
        const int64_t nb = std::min<int64_t>(kNR, N - n0);
        for (int64_t kk = k0; kk < k1; ++kk) {
          const M_ a = A[m * ars + kk * aks];
          const M_* b = B + (n0 / kNR) * bps + kk * ldb;
          for (int64_t n = 0; n < nb; ++n) c[n0 + n] += a * b[n];
        }
      }
    }
  }
}

// e^x for x <= ~0, and exactly 0 below -87 (so no subnormal ever enters a product; e^-87 = 1.6e-38
// is below fp32 resolution of any row sum that also holds the row's maximum term e^0 = 1).
inline float exp_or_zero(float x) {
  constexpr uint32_t kClamp = 0xC2AE0000u;  // bits of -87.0f; larger bits = more negative (or NaN)
  const uint32_t u = float_to_bits(x);
  const bool under = u > kClamp && (u >> 31);
  const float e = exp_nonpositive(bits_to_float(under ? kClamp : u));
  return bits_to_float(under ? 0u : float_to_bits(e));
}
inline double exp_or_zero(double x) { return std::exp(x); }

// 2^x, exactly 0 below -125 (x = -inf: 0; no subnormal ever enters a product); the forward works in log2
// units (Q scaled by scale * log2(e)), so its softmax needs no multiply by log2(e). 2^r on [-1/2, 1/2] by a
// degree-6 minimax polynomial (relative error 2e-9, about 1 ulp after fp32 rounding). With AVX-512 the
// reduction is one vreduceps and the scaling one masked vscalefps: 10 instructions per 16 exponentials
// against 20 for exp_or_zero's (clamps, n / 2 split, two scale multiplies).
inline vecf exp2_or_zero(vecf x) {
  const auto poly = [](vecf r) {
    vecf p = r * 1.534581242594868e-4f + 1.339993090368807e-3f;
    p = p * r + 9.618489071726799e-3f;
    p = p * r + 5.550328642129898e-2f;
    p = p * r + 2.402264624834061e-1f;
    p = p * r + 6.931471824645996e-1f;
    return p * r + 1.0f;
  };
#if defined(__AVX512F__) && defined(__AVX512DQ__)
  const __m512 r = _mm512_reduce_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // x - round(x)
  const __m512 n = _mm512_sub_ps(x, r);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-125.0f), _CMP_GE_OQ);  // false for -inf, NaN
  return _mm512_maskz_scalef_ps(keep, poly(r), n);
#else
  typedef int32_t vi __attribute__((vector_size(kVW * sizeof(int32_t))));
  const vecf xc = x < -127.0f ? vecf{} - 127.0f : x;      // -inf: -127 (2^-127 becomes 0 below)
  const vecf n = (xc + 12582912.0f) - 12582912.0f;       // round to nearest
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;  // 2^n, n in [-127, ..]: 0 for -127
  vecf scale;
  std::memcpy(&scale, &e, sizeof scale);
  const vecf y = poly(xc - n) * scale;
  return x >= -125.0f ? y : vecf{};
#endif
}
inline float exp2_or_zero(float x) {
  vecf v{};
  v[0] = x;
  return exp2_or_zero(v)[0];
}
inline double exp2_or_zero(double x) { return std::exp2(x); }

// A row's softmax reference (its running maximum) moves only when a tile's maximum exceeds it by more than
// kLazy (log2 units, as FlashAttention-4): P entries up to 2^kLazy, no overflow, the same result, and most
// tiles need no rescale of O.
constexpr float kLazy = 8.0f;
constexpr double kLog2e = 1.4426950408889634, kLn2 = 0.6931471805599453;

// One key tile's online-softmax step for one query row: s [n] (n a multiple of kVW, -inf where hidden) holds the
// scores in log2 units and gets P = 2^(s - m); m (the row's reference) moves to the tile's maximum only when
// that exceeds it by more than kLazy, alpha is then the factor for the row's O and sum (1: unchanged). Returns
// the sum of P.
template <typename M_>
M_ softmax_row(M_* s, int64_t n, M_& m, M_& alpha) {
  constexpr M_ ninf = -std::numeric_limits<M_>::infinity();
  if constexpr (std::is_same_v<M_, float>) {
    vecf x = vecf{} + ninf;
    for (int64_t c = 0; c < n; c += kVW) {
      const vecf v = vload(s + c);
      x = v > x ? v : x;
    }
    float mx = x[0];
    for (int i = 1; i < kVW; ++i) mx = x[i] > mx ? x[i] : mx;
    if (mx > m + kLazy) {  // m = -inf: any visible key; nothing visible yet: m stays -inf
      alpha = exp2_or_zero(m - mx);  // 0 where m was -inf (O and l are 0)
      m = mx;
    }
    const vecf mu = vecf{} + (m == ninf ? 0.0f : m);  // an unseen row: every P entry is 2^-inf = 0
    vecf acc{};
    for (int64_t c = 0; c < n; c += kVW) {
      const vecf p = exp2_or_zero(vload(s + c) - mu);
      vstore(s + c, p);
      acc += p;
    }
    float sum = 0;
    for (int i = 0; i < kVW; ++i) sum += acc[i];
    return sum;
  } else {  // fp64 (gradcheck only)
    M_ mx = ninf;
    for (int64_t c = 0; c < n; ++c) mx = std::max(mx, s[c]);
    if (mx > m + kLazy) {
      alpha = exp2_or_zero(m - mx);
      m = mx;
    }
    const M_ mu = m == ninf ? M_(0) : m;
    M_ sum = 0;
    for (int64_t c = 0; c < n; ++c) sum += (s[c] = exp2_or_zero(s[c] - mu));
    return sum;
  }
}

// softmax_row for one query row plus the rest of the online-softmax step: l (the row's sum) and its output
// row o [D] rescaled when the reference m moved.
template <typename M_>
inline void online_softmax_step(M_* s, int64_t n, M_& m, M_& l, M_* o, int64_t D) {
  M_ alpha = 1;
  const M_ sum = softmax_row<M_>(s, n, m, alpha);
  l = l * alpha + sum;
  if (alpha != M_(1)) {
#pragma omp simd
    for (int64_t c = 0; c < D; ++c) o[c] *= alpha;
  }
}

// sum_c a[c] b[c], c < D.
template <typename M_>
inline M_ dot_row(const M_* a, const M_* b, int64_t D) {
  if constexpr (std::is_same_v<M_, float>) {
    vecf acc{};
    int64_t c = 0;
    for (; c + kVW <= D; c += kVW) acc += vload(a + c) * vload(b + c);
    float s = 0;
    for (int i = 0; i < kVW; ++i) s += acc[i];
    for (; c < D; ++c) s += a[c] * b[c];
    return s;
  } else {
    M_ s = 0;
    for (int64_t c = 0; c < D; ++c) s += a[c] * b[c];
    return s;
  }
}

// The visible key range of query row i of one sequence: [lo(i), hi(i)], both non-decreasing in i.
struct SeqMask {
  int64_t lq, lk, off, left, right;
  SeqMask(int64_t lq_, int64_t lk_, const AttentionShape& a)
      : lq(lq_), lk(lk_), off(lk_ - lq_), left(a.window_left), right(a.causal ? 0 : a.window_right) {}
  int64_t lo(int64_t i) const { return left < 0 ? 0 : std::max<int64_t>(0, i + off - left); }
  int64_t hi(int64_t i) const { return right < 0 ? lk - 1 : std::min<int64_t>(lk - 1, i + off + right); }
  // Rows [i0, i1) see every key of [j0, j1).
  bool full(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const { return lo(i1 - 1) <= j0 && hi(i0) >= j1 - 1; }
  // Query rows that see some key of [j0, j1): [first, last).
  int64_t first_row(int64_t j0) const {
    return right < 0 ? 0 : std::max<int64_t>(0, j0 - off - right);
  }
  int64_t last_row(int64_t j1) const {
    return left < 0 ? lq : std::min<int64_t>(lq, j1 - 1 - off + left + 1);
  }
};

// Which sequences take the short path, and its work items. A sequence of at most kShortLen query and key
// rows whose staged operands for one kv head (bytes_per_kv_head(lq, lk)) fit kStageBytes is one or more
// items of chunk[b] kv heads each (with their query heads): the item reads the sequence's rows token by
// token, all heads of the chunk at once, into per-head buffers. chunk[b] = 0: the tiled path.
struct ShortPlan {
  std::unique_ptr<int64_t[]> chunk, seq, hk0;
  // max_stage_bytes: the largest item's staged operands (chunk[b] * bytes_per_kv_head), what a thread's staging
  // buffer must hold; sized per call rather than kStageBytes, so a call on a few short sequences does not allocate
  // and zero 768 KiB per thread (the tiny Qwen2.5-VL's attention calls are tens of microseconds of work).
  int64_t count = 0, max_lq = 0, max_lk = 0, max_stage_bytes = 0;
  // Sequences of 1 .. few_rows query rows (chunk[b] = -1) take neither path (the forward's few-rows path):
  // few_seq lists them. With skip_queryless (the forward: nothing to compute for a sequence without query
  // rows; the backward must still zero its keys' gradients) such sequences take no path at all (chunk[b] =
  // -2): generation describes the unused tail of each sequence's cache buffer as one of them.
  std::unique_ptr<int64_t[]> few_seq;
  int64_t few_count = 0;
  template <typename F>
  ShortPlan(const AttentionShape& a, int threads, F&& bytes_per_kv_head, int64_t few_rows = 0,
            bool skip_queryless = false)
      : chunk(new int64_t[a.batch + 1]), few_seq(new int64_t[a.batch + 1]) {
    const int32_t *cq = a.cu_seqlens_q, *ck = a.cu_seqlens_k;
    int64_t seqs = 0;
    for (int64_t b = 0; b < a.batch; ++b) {
      const int64_t lq = cq[b + 1] - cq[b], lk = ck[b + 1] - ck[b];
      if (lq == 0 && skip_queryless) {
        chunk[b] = -2;
        continue;
      }
      if (lq > 0 && lq <= few_rows) {
        chunk[b] = -1;
        few_seq[few_count++] = b;
        continue;
      }
      const int64_t per_head = bytes_per_kv_head(lq, lk);
      chunk[b] = lq <= kShortLen && lk <= kShortLen && (lq > 0 || lk > 0) && per_head <= kStageBytes
                     ? std::min<int64_t>(a.heads_k, kStageBytes / per_head)
                     : 0;
      if (chunk[b] > 0) {
        ++seqs;
        max_lq = std::max(max_lq, lq);
        max_lk = std::max(max_lk, lk);
      }
    }
    // At least 4 items per thread where the heads allow it (a few short sequences alone).
    const int64_t cap = std::max<int64_t>(1, a.heads_k * seqs / (4 * int64_t(threads)));
    for (int64_t b = 0; b < a.batch; ++b)
      if (chunk[b] > 0) {
        chunk[b] = std::min(chunk[b], cap);
        chunk[b] = (a.heads_k + (a.heads_k + chunk[b] - 1) / chunk[b] - 1) / ((a.heads_k + chunk[b] - 1) / chunk[b]);
        count += (a.heads_k + chunk[b] - 1) / chunk[b];
        max_stage_bytes = std::max(max_stage_bytes, chunk[b] * bytes_per_kv_head(cq[b + 1] - cq[b], ck[b + 1] - ck[b]));
      }
    seq.reset(new int64_t[count > 0 ? count : 1]);
    hk0.reset(new int64_t[count > 0 ? count : 1]);
    int64_t s = 0;
    for (int64_t b = 0; b < a.batch; ++b)
      for (int64_t h = 0; chunk[b] > 0 && h < a.heads_k; h += chunk[b]) {
        seq[s] = b;
        hk0[s] = h;
        ++s;
      }
  }
  bool is_short(int64_t b) const { return chunk[b] > 0; }
  bool tiled(int64_t b) const { return chunk[b] == 0; }
};

// Work items over (sequence, tile) of the sequences that take the tiled path: tile t of the flattened list
// covers rows [row0, row0 + n) of sequence seq. Built once per call; O(total tiles) memory.
struct TileList {
  std::unique_ptr<int64_t[]> seq, row0;
  int64_t count = 0;
  int64_t max_rows = 0;  // rows of the largest tile: buffers are sized to it (1 for a decoding step, not kFQ)
  TileList(const int32_t* cu, int64_t batch, int64_t tile, const ShortPlan& plan) {
    for (int64_t b = 0; b < batch; ++b)
      if (plan.tiled(b)) {
        count += (cu[b + 1] - cu[b] + tile - 1) / tile;
        max_rows = std::max<int64_t>(max_rows, std::min<int64_t>(tile, cu[b + 1] - cu[b]));
      }
    seq.reset(new int64_t[count > 0 ? count : 1]);
    row0.reset(new int64_t[count > 0 ? count : 1]);
    int64_t t = 0;
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t r = 0; plan.tiled(b) && r < cu[b + 1] - cu[b]; r += tile) {
        seq[t] = b;
        row0[t] = r;
        ++t;
      }
  }
};

// ---- one row of a [T, H, D] tensor into the layouts the products read -------------------------------

// d[c] = s[c], c < D, in the math type. fp32 rows are copied with inline vector moves: GCC turns load_row's
// loop into a memcpy call, and 200k calls of 320 bytes per window-attention forward cost more than the bytes.
template <typename T>
inline void copy_row(const T* s, math_t<T>* d, int64_t D) {
  if constexpr (std::is_same_v<T, float>) {
    int64_t c = 0;
    for (; c + kVW <= D; c += kVW) {
      vecf x = vload(s + c);
#if defined(__x86_64__)
      __asm__("" : "+v"(x));  // keeps GCC from recognising the loop as a memcpy again
#elif defined(__aarch64__)
      __asm__("" : "+w"(x));
#endif
      vstore(d + c, x);
    }
    for (; c < D; ++c) d[c] = s[c];
  } else {
    load_row<T>(s, d, D);
  }
}

// Plain: d[c] = s[c] * mul, c < D.
template <typename T, typename M_>
inline void put_row(const T* s, int64_t D, M_* d, M_ mul) {
  copy_row<T>(s, d, D);
  if (mul != M_(1)) {
#pragma omp simd
    for (int64_t c = 0; c < D; ++c) d[c] *= mul;
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#define MMFUSE_ATTN_SHUFFLE 1
typedef int32_t veci __attribute__((vector_size(kVW * sizeof(int32_t))));

// In-register transpose of a kVW x kVW block: log2(kVW) rounds, round d exchanging the off-diagonal d x d
// blocks of every 2d x 2d block with two-source shuffles (one vpermt2ps each with AVX-512).
template <int d>
inline void transpose_rounds(vecf* x) {
  if constexpr (d >= 1) {
    veci lo, hi;
#pragma GCC unroll 16
    for (int p = 0; p < kVW; ++p) {
      lo[p] = (p & d) ? kVW + p - d : p;
      hi[p] = (p & d) ? kVW + p : p + d;
    }
#pragma GCC unroll 16
    for (int i = 0; i < kVW; ++i)
      if ((i & d) == 0) {
        const vecf a = x[i], b = x[i + d];
        x[i] = __builtin_shuffle(a, b, lo);
        x[i + d] = __builtin_shuffle(a, b, hi);
      }
    transpose_rounds<d / 2>(x);
  }
}
#endif

// Rows [0, n) (n <= kVW) of one head, `lds` elements of src apart, transposed: dst[c * ldd + r] = row r,
// column c, times mul, for c < D and every r < kVW (rows n .. kVW are zeros). tmp: kVW rows of
// round_up(D, kVW), zero beyond D. One scalar store per element cost 3 instructions (extract, store,
// address); the block transpose takes log2(kVW) shuffles per vector of kVW elements.
template <typename T, typename M_>
void put_rows_transposed(const T* src, int64_t lds, int64_t n, int64_t D, M_* dst, int64_t ldd, M_* tmp, M_ mul) {
  const int64_t Dv = round_up(D, kVW);
  for (int64_t r = 0; r < kVW; ++r) {
    if (r < n)
      copy_row<T>(src + r * lds, tmp + r * Dv, D);
    else
      std::memset(tmp + r * Dv, 0, sizeof(M_) * D);
  }
#if defined(MMFUSE_ATTN_SHUFFLE)
  if constexpr (std::is_same_v<M_, float>) {
    for (int64_t c0 = 0; c0 < D; c0 += kVW) {
      vecf x[kVW];
#pragma GCC unroll 16
      for (int r = 0; r < kVW; ++r) x[r] = vload(tmp + r * Dv + c0) * mul;
      transpose_rounds<kVW / 2>(x);
      const int64_t nc = std::min<int64_t>(kVW, D - c0);
#pragma GCC unroll 16
      for (int c = 0; c < kVW; ++c)
        if (c < nc) vstore(dst + (c0 + c) * ldd, x[c]);
    }
    return;
  }
#endif
  for (int64_t r = 0; r < kVW; ++r)
    for (int64_t c = 0; c < D; ++c) dst[c * ldd + r] = tmp[r * Dv + c] * mul;
}

// Row r of a panel-packed block (d = block + r * kNR, panels `panel` floats apart): element c goes to
// d[(c / kNR) * panel + c % kNR] for c < Dpn (columns D .. Dpn: row_buf's, which stay zero).
template <typename T, typename M_>
inline void put_row_panels(const T* s, int64_t D, int64_t Dpn, M_* d, int64_t panel, M_* row_buf) {
  copy_row<T>(s, row_buf, D);
  for (int64_t p = 0; p < Dpn; p += kNR, d += panel) {
    if constexpr (std::is_same_v<M_, float>) {
      vstore(d, vload(row_buf + p));
      vstore(d + kVW, vload(row_buf + p + kVW));
    } else {
      std::memcpy(d, row_buf + p, sizeof(M_) * kNR);
    }
  }
}

// ---- tiles of one head (the tiled path) ----------------------------------------------------------------

// Rows [r0, r0 + n) of head h into dst [n x ld] (times mul); columns D .. ld stay as they are.
template <typename T, typename M_>
void load_rows(const T* src, int64_t r0, int64_t n, int64_t H, int64_t h, int64_t D, M_* dst, int64_t ld, M_ mul) {
  for (int64_t r = 0; r < n; ++r) put_row<T, M_>(src + ((r0 + r) * H + h) * D, D, dst + r * ld, mul);
}

// Transposed: dst[c * ld + r] (times mul), r < round_up(n, kVW) (columns n .. that are zero; columns beyond
// keep zeros or stale values of earlier tiles, which the callers never read).
template <typename T, typename M_>
void load_rows_transposed(const T* src, int64_t r0, int64_t n, int64_t H, int64_t h, int64_t D, M_* dst, int64_t ld,
                          M_* tmp, M_ mul) {
  for (int64_t r = 0; r < n; r += kVW)
    put_rows_transposed<T, M_>(src + ((r0 + r) * H + h) * D, H * D, std::min<int64_t>(kVW, n - r), D, dst + r, ld, tmp,
                               mul);
}

// Panel-packed rows: element (r, c) goes to dst[(c / kNR) * n * kNR + r * kNR + c % kNR] for c < Dpn (columns
// D .. Dpn zero), so a micro-kernel column block reads n * kNR contiguous floats.
template <typename T, typename M_>
void pack_rows(const T* src, int64_t r0, int64_t n, int64_t H, int64_t h, int64_t D, int64_t Dpn, M_* dst,
               M_* row_buf) {
  for (int64_t r = 0; r < n; ++r)
    put_row_panels<T, M_>(src + ((r0 + r) * H + h) * D, D, Dpn, dst + r * kNR, n * kNR, row_buf);
}

// Panel-packed transpose (times mul): element (r, c) goes to dst[(r / kNR) * D * kNR + c * kNR + r % kNR].
template <typename T, typename M_>
void pack_rows_transposed(const T* src, int64_t r0, int64_t n, int64_t H, int64_t h, int64_t D, M_* dst, M_* tmp,
                          M_ mul) {
  for (int64_t r = 0; r < n; r += kVW)
    put_rows_transposed<T, M_>(src + ((r0 + r) * H + h) * D, H * D, std::min<int64_t>(kVW, n - r), D,
                               dst + (r / kNR) * D * kNR + r % kNR, kNR, tmp, mul);
}

template <typename T, typename M_>
void store_rows(const M_* src, int64_t ld, int64_t r0, int64_t n, int64_t H, int64_t h, int64_t D, T* dst, M_ mul) {
  for (int64_t r = 0; r < n; ++r) {
    const M_* s = src + r * ld;
    T* d = dst + ((r0 + r) * H + h) * D;
    if constexpr (kElementwiseVectorises<T>) {
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) d[c] = store<T>(s[c] * mul);
    } else {
      for (int64_t c = 0; c < D; ++c) d[c] = store<T>(s[c] * mul);
    }
  }
}

// Short path: rows [r0, r0 + n) of heads [h0, h1) of a [T, H, D] tensor, token by token: the heads of one
// token are contiguous, so the reads stream through memory instead of jumping H * D elements (a page or
// more) per row as a one-head tile load does. put(r, head - h0, row).
template <typename T, typename F>
inline void for_rows_of_heads(const T* src, int64_t r0, int64_t n, int64_t H, int64_t h0, int64_t h1, int64_t D,
                              F&& put) {
  for (int64_t r = 0; r < n; ++r) {
    const T* s = src + ((r0 + r) * H + h0) * D;
    for (int64_t hl = 0; hl < h1 - h0; ++hl) put(r, hl, s + hl * D);
  }
}

// The same for transposed staging, kVW tokens at a time: put(r, head - h0, rows, H * D, n) for rows
// [r, r + n) of that head.
template <typename T, typename F>
inline void for_row_blocks_of_heads(const T* src, int64_t r0, int64_t n, int64_t H, int64_t h0, int64_t h1, int64_t D,
                                    F&& put) {
  for (int64_t r = 0; r < n; r += kVW)
    for (int64_t hl = 0; hl < h1 - h0; ++hl)
      put(r, hl, src + ((r0 + r) * H + h0 + hl) * D, H * D, std::min<int64_t>(kVW, n - r));
}

// Short path, the way back: a staged [n][h1 - h0][D] block (math type) into rows [r0, r0 + n) of heads [h0, h1)
// of a [T, H, D] tensor, times mul: one contiguous run per token instead of a page-strided row per head.
template <typename T, typename M_>
void store_rows_of_heads(const M_* src, int64_t r0, int64_t n, int64_t H, int64_t h0, int64_t h1, int64_t D, T* dst,
                         M_ mul) {
  const int64_t w = (h1 - h0) * D;
  for (int64_t r = 0; r < n; ++r) {
    const M_* s = src + r * w;
    T* d = dst + ((r0 + r) * H + h0) * D;
    if constexpr (kElementwiseVectorises<T>) {
#pragma omp simd
      for (int64_t c = 0; c < w; ++c) d[c] = store<T>(s[c] * mul);
    } else {
      for (int64_t c = 0; c < w; ++c) d[c] = store<T>(s[c] * mul);
    }
  }
}

// Sub-buffers of a staging area start on 64-byte boundaries.
inline int64_t stage_size(int64_t elems) { return round_up(elems, 16); }

// P = exp(S - lse) over one tile (rows [i0, i0 + ni), keys [j0, j0 + nk) of the sequence), masked.
template <typename M_>
void probabilities(M_* S, int64_t ld, const M_* lse, int64_t ni, int64_t nk, int64_t i0, int64_t j0,
                   const SeqMask& mask, bool full) {
  for (int64_t r = 0; r < ni; ++r) {
    M_* s = S + r * ld;
    const M_ l = lse[r];
    if (l == -std::numeric_limits<M_>::infinity()) {  // the row sees no key at all
      for (int64_t c = 0; c < nk; ++c) s[c] = 0;
      continue;
    }
    if constexpr (std::is_same_v<M_, float>) {
      // 2^(s log2 e - lse log2 e) through the forward's exp2 (one vreduceps + polynomial + vscalefps with
      // AVX-512): exp_or_zero here took 16.5% of the backward (S 2048, H 16, D 128, one thread of a 2-core AVX2 EPYC), this 2.2%.
      const vecf l2 = vecf{} + l * float(kLog2e);
      int64_t c = 0;
      for (; c + kVW <= nk; c += kVW) vstore(s + c, exp2_or_zero(vload(s + c) * float(kLog2e) - l2));
      for (; c < nk; ++c) s[c] = exp2_or_zero(s[c] * float(kLog2e) - l2[0]);
    } else {
      for (int64_t c = 0; c < nk; ++c) s[c] = exp_or_zero(s[c] - l);
    }
    if (!full) {
      const int64_t lo = mask.lo(i0 + r) - j0, hi = mask.hi(i0 + r) - j0;
      for (int64_t c = 0; c < nk; ++c)
        if (c < lo || c > hi) s[c] = 0;
    }
  }
}

template <typename T>
void fwd_kernel(const AttentionFwdArgs& a) {
  using M_ = math_t<T>;
  const int64_t D = a.dim, Hq = a.heads_q, Hk = a.heads_k, group = Hq / Hk;
  const int64_t Dp = round_up(D, kVW), Dpn = round_up(D, kNR);
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  T* out = static_cast<T*>(a.out);
  M_* lse_out = static_cast<M_*>(a.lse);
  // Scores in log2 units: P = 2^(S - m) with no multiply per element; lse = ln 2 * (m + log2 l).
  const M_ scale2 = static_cast<M_>(a.scale * kLog2e);
  const M_ ninf = -std::numeric_limits<M_>::infinity();
  // Bytes touched: Q and out, or K and V where a few query rows (generation steps) read long caches.
  const int nt0 = resolve_threads(a.num_threads, a.total_q * Hq,
                                  std::max(a.total_q * Hq, a.total_k * Hk) * D * int64_t(sizeof(T)) * 4);
  // Short path, staged per kv head: its query heads' scaled Q rows, K^T panels, V rows.
  const auto stage_q = [&](int64_t lq) { return stage_size(lq * D); };
  const auto stage_k = [&](int64_t lk) { return stage_size(round_up(lk, kNR) * D); };
  const auto stage_v = [&](int64_t lk) { return stage_size(lk * Dp); };
  const auto stage_o = [&](int64_t lq) { return stage_size(lq * D); };  // the output, token-major
  const ShortPlan plan(a, nt0, [&](int64_t lq, int64_t lk) {
    return (group * (stage_q(lq) + stage_o(lq)) + stage_k(lk) + stage_v(lk)) * int64_t(sizeof(M_));
  }, kFewRows, /*skip_queryless=*/true);
  const TileList tiles(a.cu_seqlens_q, a.batch, kFQ, plan);
  const int64_t long_items = tiles.count * Hq, short_end = long_items + plan.count;
  const int64_t items = short_end + plan.few_count * Hk;
  const int nt = static_cast<int>(std::min<int64_t>(nt0, std::max<int64_t>(items, 1)));
  // The tiled path's keys, packed once per call (math type) in kNR-key panels, each sequence starting a panel
  // (krow[b]: its first key's slot): K^T panels Ktg [Hk][Tkl / kNR][D][kNR] (keys past a sequence's end are
  // zeros) and V panels Vg [Hk][Dpn / kNR][Tkl][kNR]. Copied per item out of the [T, H, D] inputs instead, each
  // query tile re-read its head's K and V rows a page apart, again for every query head of a GQA group.
  std::unique_ptr<int64_t[]> krow(new int64_t[a.batch + 1]);
  int64_t Tkl = 0;
  for (int64_t b = 0; b < a.batch; ++b) {
    krow[b] = Tkl;
    if (plan.tiled(b)) Tkl += round_up(a.cu_seqlens_k[b + 1] - a.cu_seqlens_k[b], kNR);
  }
  const int64_t npan = Dpn / kNR;
  std::unique_ptr<M_[]> Kgb(new M_[Tkl > 0 ? Hk * Tkl * D : 1]), Vgb(new M_[Tkl > 0 ? Hk * npan * Tkl * kNR : 1]);
  const TileList kchunks(a.cu_seqlens_k, a.batch, 64, plan);

#pragma omp parallel num_threads(nt)
  {
    {
      std::unique_ptr<M_[]> rowb(new M_[Dpn]()), tmpb(new M_[kVW * Dpn]());
#pragma omp for schedule(static)
      for (int64_t t = 0; t < kchunks.count; ++t) {
        const int64_t b = kchunks.seq[t], k0 = a.cu_seqlens_k[b], j0 = kchunks.row0[t];
        const int64_t n = std::min<int64_t>(64, a.cu_seqlens_k[b + 1] - k0 - j0);
        for (int64_t hk = 0; hk < Hk; ++hk) {
          for (int64_t j = j0; j < j0 + round_up(n, kNR); j += kVW)  // the last panel's tail: zeros
            put_rows_transposed<T, M_>(k + ((k0 + j) * Hk + hk) * D, Hk * D,
                                       std::max<int64_t>(0, std::min<int64_t>(kVW, j0 + n - j)), D,
                                       Kgb.get() + (hk * Tkl + krow[b] + j) / kNR * D * kNR + j % kNR, kNR, tmpb.get(),
                                       M_(1));
          for (int64_t j = j0; j < j0 + n; ++j)
            put_row_panels<T, M_>(v + ((k0 + j) * Hk + hk) * D, D, Dpn,
                                  Vgb.get() + (hk * npan * Tkl + krow[b] + j) * kNR, Tkl * kNR, rowb.get());
        }
      }
    }
    constexpr int64_t ldS = round_up(kFK, kVW) + kVW;  // S rows: an odd number of vectors (L1 sets)
    // Query rows one attend() call handles: a tile, or at most the longest short sequence. Buffers sized to
    // the call: zeroing kFQ-row buffers and a full staging area per thread cost more than the attention itself
    // for the tiny Qwen2.5-VL's calls.
    // A generation step's single query row per sequence takes the tiled path when the cache is long: a kFQ-row
    // buffer set per thread, zeroed, cost 0.39 ms per call there (100m preset, 600 cached keys) against ~0.05 of work.
    const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(kFQ, std::max(tiles.max_rows, plan.max_lq)));
    std::unique_ptr<M_[]> Qb(new M_[long_items > 0 ? tiles.max_rows * D : 1]()), Sb(new M_[rows * ldS]()),
        Ob(new M_[rows * Dp]()), mb(new M_[rows]), lb(new M_[rows]), tmpb(new M_[kVW * Dpn]()),
        stageb(plan.count > 0 ? new M_[plan.max_stage_bytes / sizeof(M_) + 1]() : nullptr);
    M_ *S = Sb.get(), *O = Ob.get(), *m = mb.get(), *l = lb.get();
    // Few-rows path: the query rows of one kv head's group ([group][lq] rows), their scores over a block of keys,
    // outputs and softmax state; K and V blocks converted to the math type for half-precision inputs.
    const bool few = plan.few_count > 0;
    const int64_t fr = few ? group * kFewRows : 1;
    constexpr bool kInPlace = std::is_same_v<T, M_>;
    std::unique_ptr<M_[]> Qfb(new M_[fr * Dp]), Sfb(new M_[few ? fr * kFewKeys : 1]), Ofb(new M_[fr * Dp]),
        mfb(new M_[fr]), lfb(new M_[fr]), KVfb(new M_[few && !kInPlace ? 2 * kFewKeys * Dp : 1]);

    // Sequence b, kv head hk: scores row by row (one dot product per visible key), an online softmax per block of
    // kFewKeys keys, then O += P V with each value row read once for all the rows.
    auto few_rows = [&](int64_t b, int64_t hk) {
      const int64_t q0 = a.cu_seqlens_q[b], k0 = a.cu_seqlens_k[b];
      const SeqMask mask(a.cu_seqlens_q[b + 1] - q0, a.cu_seqlens_k[b + 1] - k0, a);
      const int64_t lq = mask.lq, R = group * lq;
      M_ *Qf = Qfb.get(), *Sf = Sfb.get(), *Of = Ofb.get(), *mf = mfb.get(), *lf = lfb.get();
      for (int64_t g = 0; g < group; ++g)
        for (int64_t i = 0; i < lq; ++i) {  // row g * lq + i: query row i of head hk * group + g
          put_row<T, M_>(q + ((q0 + i) * Hq + hk * group + g) * D, D, Qf + (g * lq + i) * Dp, scale2);
          mf[g * lq + i] = ninf;
          lf[g * lq + i] = 0;
        }
      std::fill(Of, Of + R * Dp, M_(0));
      const int64_t jbeg = mask.lo(0), jend = mask.hi(lq - 1) + 1;  // every key some row sees
      for (int64_t j0 = jbeg; j0 < jend; j0 += kFewKeys) {
        const int64_t nb = std::min<int64_t>(kFewKeys, jend - j0), nbv = round_up(nb, kVW);
        const M_ *Kr, *Vr;
        int64_t ldkv;
        if constexpr (kInPlace) {
          Kr = k + ((k0 + j0) * Hk + hk) * D;
          Vr = v + ((k0 + j0) * Hk + hk) * D;
          ldkv = Hk * D;
        } else {
          M_* Kc = KVfb.get();
          for (int64_t n = 0; n < nb; ++n) {
            put_row<T, M_>(k + ((k0 + j0 + n) * Hk + hk) * D, D, Kc + n * Dp, M_(1));
            put_row<T, M_>(v + ((k0 + j0 + n) * Hk + hk) * D, D, Kc + (kFewKeys + n) * Dp, M_(1));
          }
          Kr = Kc;
          Vr = Kc + kFewKeys * Dp;
          ldkv = Dp;
        }
        for (int64_t rr = 0; rr < R; ++rr) {
          const int64_t i = rr % lq;
          const int64_t lo = std::max<int64_t>(0, mask.lo(i) - j0), hi = std::min<int64_t>(nb, mask.hi(i) - j0 + 1);
          M_* s = Sf + rr * kFewKeys;
          const M_* qr = Qf + rr * Dp;
          for (int64_t n = 0; n < nbv; ++n) s[n] = ninf;
          for (int64_t n = lo; n < hi; ++n) s[n] = dot_row<M_>(qr, Kr + n * ldkv, D);
          online_softmax_step<M_>(s, nbv, mf[rr], lf[rr], Of + rr * Dp, D);
        }
        for (int64_t n = 0; n < nb; ++n) {
          const M_* vr = Vr + n * ldkv;
          for (int64_t rr = 0; rr < R; ++rr) {
            const M_ p = Sf[rr * kFewKeys + n];
            if (p == M_(0)) continue;
            M_* o = Of + rr * Dp;
#pragma omp simd
            for (int64_t c = 0; c < D; ++c) o[c] += p * vr[c];
          }
        }
      }
      for (int64_t rr = 0; rr < R; ++rr) {
        const int64_t g = rr / lq, i = rr % lq, h = hk * group + g;
        M_* o = Of + rr * Dp;
        const M_ inv = lf[rr] > 0 ? M_(1) / lf[rr] : M_(0);
        for (int64_t c = 0; c < D; ++c) o[c] *= inv;
        lse_out[h * a.total_q + q0 + i] = lf[rr] > 0 ? (mf[rr] + std::log2(lf[rr])) * M_(kLn2) : ninf;
        store_rows<T, M_>(o, Dp, q0 + i, 1, Hq, h, D, out, M_(1));
      }
    };

    // Query rows [i0, i0 + ni) of head h of a sequence whose rows start at q0: Qr holds them scaled (rows D apart);
    // kv_tile(j0, nk, Kp, Vp, vld, vbps) points Kp at the K^T panels of keys [j0, j0 + nk) (j0 a multiple of kNR;
    // [D][kNR] each, D * kNR apart) and Vp at the value rows as a product's B operand (rows vld apart, kNR-column
    // blocks vbps apart: panels in the tiled path, plain rows in the short one). Writes lse, and the output rows to
    // out or, when os is set, to os[r * lds] (the short path's token-major staging).
    // S = Q K^T is kept row-major ([query][key]): P V then reads P's rows as 12 sequential streams (160 GFLOP/s on
    // one core) where P^T's 12 consecutive floats per step, a row 1.5 KiB apart, reached 145.
    auto attend = [&](int64_t h, int64_t q0, const SeqMask& mask, int64_t i0, int64_t ni, const M_* Qr,
                      auto&& kv_tile, M_* os, int64_t lds, bool prefetch) {
      for (int64_t r = 0; r < ni; ++r) {
        m[r] = ninf;
        l[r] = 0;
      }
      std::memset(O, 0, sizeof(M_) * ni * Dp);
      const int64_t kbeg = mask.lo(i0) / kNR * kNR, kend = mask.hi(i0 + ni - 1) + 1;
      for (int64_t j0 = kbeg; j0 < kend; j0 += kFK) {
        const int64_t nk = std::min<int64_t>(kFK, kend - j0), nkv = round_up(nk, kVW);
        const bool full = mask.full(i0, i0 + ni, j0, j0 + nk);
        const M_ *Kp, *Vp;
        int64_t vld, vbps;
        kv_tile(j0, nk, Kp, Vp, vld, vbps);
        // Query rows [0, rs) see no key of this tile (causal / right window).
        const int64_t rs = std::min<int64_t>(ni, std::max<int64_t>(0, mask.first_row(j0) - i0));
        Prefetch pf;
        if (prefetch && j0 + kFK < kend) {  // the next tile, spread over the S product's calls
          const int64_t nk2 = std::min<int64_t>(kFK, kend - j0 - kFK);
          const M_ *Kn, *Vn;
          int64_t vld2, vbps2;
          kv_tile(j0 + kFK, nk2, Kn, Vn, vld2, vbps2);
          pf.add(Kn, round_up(nk2, kNR) * D * int64_t(sizeof(M_)));
          for (int64_t p = 0; p < Dpn; p += kNR) pf.add(Vn + p / kNR * vbps2, nk2 * vld2 * int64_t(sizeof(M_)));
          const int64_t calls = (nkv + kNR - 1) / kNR * ((ni - rs) / kMR);
          pf.per_call = static_cast<int>(calls > 0 ? (pf.lines() + calls - 1) / calls : 0);
        }
        if (full) {
          gemm_tile<M_>(ni - rs, nkv, D, Qr + rs * D, D, 1, Kp, kNR, S + rs * ldS, ldS, false, D * kNR, &pf);
        } else {
          // Per panel of kNR keys only the query rows that see one of them (the causal diagonal's hidden triangle
          // is skipped); the rest is masked below.
          for (int64_t n0 = 0; n0 < nkv; n0 += kNR) {
            const int64_t r0 = std::max<int64_t>(rs, mask.first_row(j0 + n0) - i0);
            const int64_t r1 = std::min<int64_t>(ni, mask.last_row(j0 + std::min<int64_t>(nk, n0 + kNR)) - i0);
            if (r1 > r0)
              gemm_tile<M_>(r1 - r0, std::min<int64_t>(kNR, nkv - n0), D, Qr + r0 * D, D, 1, Kp + n0 * D, kNR,
                            S + r0 * ldS + n0, ldS, false, D * kNR, &pf);
          }
        }
        // Online softmax per query row; columns [nk, nkv) and, on a masked tile, the keys a row does not see are
        // -inf. The reference m moves only by more than kLazy; O's row is rescaled then.
        for (int64_t r = rs; r < ni; ++r) {
          M_* s = S + r * ldS;
          const int64_t lo = full ? 0 : std::min<int64_t>(nkv, std::max<int64_t>(0, mask.lo(i0 + r) - j0));
          const int64_t hi = full ? nk : std::min<int64_t>(nk, mask.hi(i0 + r) - j0 + 1);
          for (int64_t c = 0; c < lo; ++c) s[c] = ninf;
          for (int64_t c = std::max<int64_t>(hi, 0); c < nkv; ++c) s[c] = ninf;
          online_softmax_step<M_>(s, nkv, m[r], l[r], O + r * Dp, D);
        }
        if (full) {
          gemm_tile<M_>(ni - rs, Dp, nk, S + rs * ldS, ldS, 1, Vp, vld, O + rs * Dp, Dp, true, vbps);  // O += P V
        } else {  // a block of query rows takes only the keys it sees (P is 0 elsewhere: exact)
          const auto band = [&](int64_t mm, int64_t rows, int64_t, int64_t& k0, int64_t& k1) {
            k0 = std::max<int64_t>(0, mask.lo(i0 + rs + mm) - j0);
            k1 = std::min<int64_t>(nk, mask.hi(i0 + rs + mm + rows - 1) - j0 + 1);
          };
          gemm_tile<M_>(ni - rs, Dp, nk, S + rs * ldS, ldS, 1, Vp, vld, O + rs * Dp, Dp, true, vbps, nullptr, band);
        }
      }
      for (int64_t r = 0; r < ni; ++r) {
        M_* o = O + r * Dp;
        const M_ inv = l[r] > 0 ? M_(1) / l[r] : M_(0);
        if (l[r] > 0) {
#pragma omp simd
          for (int64_t c = 0; c < D; ++c) o[c] *= inv;
        } else {
          for (int64_t c = 0; c < D; ++c) o[c] = 0;
        }
        lse_out[h * a.total_q + q0 + i0 + r] = l[r] > 0 ? (m[r] + std::log2(l[r])) * M_(kLn2) : ninf;
      }
      if (os)
        for (int64_t r = 0; r < ni; ++r) copy_row<M_>(O + r * Dp, os + r * lds, D);
      else
        store_rows<T, M_>(O, Dp, q0 + i0, ni, Hq, h, D, out, M_(1));
    };

    // Tiled items first (the larger ones), head-major so that concurrent items share one head's K/V in cache.
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      if (item < long_items) {
        const int64_t t = item % tiles.count, h = item / tiles.count, hk = h / group, b = tiles.seq[t];
        const int64_t q0 = a.cu_seqlens_q[b], k0 = a.cu_seqlens_k[b];
        const SeqMask mask(a.cu_seqlens_q[b + 1] - q0, a.cu_seqlens_k[b + 1] - k0, a);
        const int64_t i0 = tiles.row0[t], ni = std::min<int64_t>(kFQ, mask.lq - i0);
        load_rows<T, M_>(q, q0 + i0, ni, Hq, h, D, Qb.get(), D, scale2);
        attend(h, q0, mask, i0, ni, Qb.get(), [&](int64_t j0, int64_t, const M_*& Kp, const M_*& Vp, int64_t& vld, int64_t& vbps) {
          Kp = Kgb.get() + (hk * Tkl + krow[b] + j0) * D;  // krow[b] + j0 is a multiple of kNR
          Vp = Vgb.get() + (hk * npan * Tkl + krow[b] + j0) * kNR;
          vld = kNR;
          vbps = Tkl * kNR;
        }, nullptr, 0, true);
        continue;
      }
      if (item >= short_end) {
        const int64_t f = item - short_end;
        few_rows(plan.few_seq[f / Hk], f % Hk);
        continue;
      }
      // Short sequence, kv heads [hk0, hk1) and their query heads: stage Q, K^T, V of every head of the chunk
      // (token-major reads), then attend per head from the staged copies.
      const int64_t s = item - long_items, b = plan.seq[s], hk0 = plan.hk0[s];
      const int64_t hk1 = std::min<int64_t>(Hk, hk0 + plan.chunk[b]), hq0 = hk0 * group, hq1 = hk1 * group;
      const int64_t q0 = a.cu_seqlens_q[b], k0 = a.cu_seqlens_k[b];
      const SeqMask mask(a.cu_seqlens_q[b + 1] - q0, a.cu_seqlens_k[b + 1] - k0, a);
      const int64_t lq = mask.lq, lk = mask.lk, sq = stage_q(lq), sk = stage_k(lk), sv = stage_v(lk);
      M_* Qs = stageb.get();             // [hq1 - hq0][lq x D], scaled
      M_* Ks = Qs + (hq1 - hq0) * sq;    // [hk1 - hk0][K^T panels of lk keys, zeros past lk]
      M_* Vs = Ks + (hk1 - hk0) * sk;    // [hk1 - hk0][lk x Dp]
      M_* Os = Vs + (hk1 - hk0) * sv;    // [lq][hq1 - hq0][D]: the output, token-major
      for_rows_of_heads(q, q0, lq, Hq, hq0, hq1, D, [&](int64_t r, int64_t hl, const T* row) {
        put_row<T, M_>(row, D, Qs + hl * sq + r * D, scale2);
      });
      for_row_blocks_of_heads(k, k0, round_up(lk, kNR), Hk, hk0, hk1, D, [&](int64_t r, int64_t hl, const T* rows, int64_t lds, int64_t) {
        put_rows_transposed<T, M_>(rows, lds, std::max<int64_t>(0, std::min<int64_t>(kVW, lk - r)), D,
                                   Ks + hl * sk + (r / kNR) * D * kNR + r % kNR, kNR, tmpb.get(), M_(1));
      });
      for_rows_of_heads(v, k0, lk, Hk, hk0, hk1, D, [&](int64_t r, int64_t hl, const T* row) {
        put_row<T, M_>(row, D, Vs + hl * sv + r * Dp, M_(1));
      });
      for (int64_t h = hq0; h < hq1; ++h) {
        const M_* Kh = Ks + (h / group - hk0) * sk;
        const M_* Vh = Vs + (h / group - hk0) * sv;
        for (int64_t i0 = 0; i0 < lq; i0 += kFQ)
          attend(h, q0, mask, i0, std::min<int64_t>(kFQ, lq - i0), Qs + (h - hq0) * sq + i0 * D,
                 [&](int64_t j0, int64_t, const M_*& Kp, const M_*& Vp, int64_t& vld, int64_t& vbps) {
                   Kp = Kh + j0 * D;
                   Vp = Vh + j0 * Dp;
                   vld = Dp;
                   vbps = kNR;
                 }, Os + i0 * (hq1 - hq0) * D + (h - hq0) * D, (hq1 - hq0) * D, false);
      }
      store_rows_of_heads<T, M_>(Os, q0, lq, Hq, hq0, hq1, D, out, M_(1));
    }
  }
}

template <typename T>
void bwd_kernel(const AttentionBwdArgs& a) {
  using M_ = math_t<T>;
  const int64_t D = a.dim, Hq = a.heads_q, Hk = a.heads_k, group = Hq / Hk, Tq = a.total_q;
  const int64_t Dp = round_up(D, kVW), Dpn = round_up(D, kNR);
  // Leading dimensions of the tiled path's row buffers: an odd number of vectors, so that the kNR-wide column
  // blocks a product reads down a B operand do not all fall in the same few L1 sets (512-byte rows map to 16 of
  // the 64 sets).
  const int64_t ldr = (Dp / kVW) % 2 ? Dp : Dp + kVW;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const T* out = static_cast<const T*>(a.out);
  const T* dout = static_cast<const T*>(a.dout);
  const M_* lse = static_cast<const M_*>(a.lse);
  const M_* dlse = static_cast<const M_*>(a.dlse);
  T* dq = static_cast<T*>(a.dq);
  T* dk = static_cast<T*>(a.dk);
  T* dv = static_cast<T*>(a.dv);
  const M_ scale = static_cast<M_>(a.scale);
  const int nt = resolve_threads(a.num_threads, Tq * Hq, Tq * Hq * D * int64_t(sizeof(T)) * 8);
  // Short path, staged per kv head: its query heads' Q and dO rows and Dv, K^T (scaled), K rows, V^T.
  const auto stage_qg = [&](int64_t lq) { return stage_size(lq * Dp); };
  const auto stage_dv = [&](int64_t lq) { return stage_size(lq); };
  const auto stage_kt = [&](int64_t lk) { return stage_size(D * round_up(lk, kNR)); };
  const auto stage_kr = [&](int64_t lk) { return stage_size(lk * Dp); };
  const auto stage_o = [&](int64_t n) { return stage_size(n * D); };  // dQ, dK, dV token-major
  const ShortPlan plan(a, nt, [&](int64_t lq, int64_t lk) {
    return (group * (2 * stage_qg(lq) + stage_dv(lq) + stage_o(lq)) + 2 * stage_kt(lk) + stage_kr(lk) + 2 * stage_o(lk)) *
           int64_t(sizeof(M_));
  });

  // The tiled path's query rows, numbered compactly (lrow[b] + i for row i of sequence b): Dv and the dQ partials
  // hold only these. glob[] maps them back to rows of q.
  std::unique_ptr<int64_t[]> lrow(new int64_t[a.batch + 1]);
  int64_t Tl = 0;
  for (int64_t b = 0; b < a.batch; ++b) {
    lrow[b] = Tl;
    if (plan.tiled(b)) Tl += a.cu_seqlens_q[b + 1] - a.cu_seqlens_q[b];
  }
  std::unique_ptr<int64_t[]> glob(new int64_t[Tl > 0 ? Tl : 1]);
  for (int64_t b = 0; b < a.batch; ++b)
    if (plan.tiled(b))
      for (int64_t i = 0; i < a.cu_seqlens_q[b + 1] - a.cu_seqlens_q[b]; ++i) glob[lrow[b] + i] = a.cu_seqlens_q[b] + i;
  const TileList qtiles(a.cu_seqlens_q, a.batch, kBQ, plan);

  // Dv [Hq, Tl] = rowsum(dO * O) - dlse: O(T H) memory.
  std::unique_ptr<M_[]> Dv(new M_[Hq * Tl > 0 ? Hq * Tl : 1]);
  // The tiled path's Q and dO rows, head-major [Hq, Tl, ldr] (zeros past D), copied once in the Dv pass (token-major
  // reads): pass 1 reads each query tile once per key tile, and loading those page-strided rows per item took 12% of
  // the backward (S 2048, H 16, D 128, one thread of a 2-core AVX2 EPYC). Where the two copies would exceed
  // kMaxPartialBytes, pass 1 loads its tiles per item instead.
  const bool qg_packed = Tl > 0 && 2 * Hq * Tl * ldr * int64_t(sizeof(M_)) <= kMaxPartialBytes;
  std::unique_ptr<M_[]> Qpk(qg_packed ? new M_[Hq * Tl * ldr] : nullptr), Gpk(qg_packed ? new M_[Hq * Tl * ldr] : nullptr);
  const auto rowsum = [&](const T* o_row, const T* g_row, M_* ob, M_* gb) {
    load_row<T>(o_row, ob, D);
    load_row<T>(g_row, gb, D);
    M_ s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < D; ++c) s += ob[c] * gb[c];
    return s;
  };
  if (Tl > 0) {
#pragma omp parallel num_threads(nt)
    {
      std::unique_ptr<M_[]> ob(new M_[D]), gb(new M_[D]);
#pragma omp for schedule(static)
      for (int64_t t = 0; t < qtiles.count; ++t) {
        const int64_t b = qtiles.seq[t], q0 = a.cu_seqlens_q[b];
        const int64_t n = std::min<int64_t>(kBQ, a.cu_seqlens_q[b + 1] - q0 - qtiles.row0[t]);
        for (int64_t i = qtiles.row0[t]; i < qtiles.row0[t] + n; ++i)
          for (int64_t h = 0; h < Hq; ++h) {
            M_* gd = qg_packed ? Gpk.get() + (h * Tl + lrow[b] + i) * ldr : gb.get();
            const M_ s = rowsum(out + ((q0 + i) * Hq + h) * D, dout + ((q0 + i) * Hq + h) * D, ob.get(), gd);
            if (qg_packed) {
              M_* qd = Qpk.get() + (h * Tl + lrow[b] + i) * ldr;
              load_row<T>(q + ((q0 + i) * Hq + h) * D, qd, D);
              std::fill(qd + D, qd + ldr, M_(0));
              std::fill(gd + D, gd + ldr, M_(0));
            }
            Dv[h * Tl + lrow[b] + i] = dlse ? s - dlse[h * Tq + q0 + i] : s;
          }
      }
    }
  }

  // Pass 1: dK, dV per (sequence, kv head, key tile). The softmax scale is folded into K^T (once
  // per item), so the Q and dO tiles are plain copies (contiguous: rows read in place are a page apart).
  // When nt private [Hq, Tl, Dp] buffers fit in kMaxPartialBytes, dQ += dS K is accumulated here too
  // (summed over the threads afterwards) and pass 2 is skipped.
  // Short sequences: one item per (sequence, chunk of kv heads) computes dQ, dK, dV of its rows completely.
  const int64_t part = Tl * Hq * Dp;
  const bool dq_in_pass1 = Tl > 0 && int64_t(nt) * part * int64_t(sizeof(M_)) <= kMaxPartialBytes;
  std::unique_ptr<M_[]> dQpart(dq_in_pass1 ? new M_[nt * part] : nullptr);
  const TileList ktiles(a.cu_seqlens_k, a.batch, kBK, plan);
  const int64_t kitems = ktiles.count * Hk;
  // Pass-1 items go to threads by a fixed rule, not dynamically: which thread's dQ partial an item lands in must
  // not depend on timing, or the dQ sum changes in its last bits from run to run (and exact resume breaks). The
  // rule balances the estimated work (visible pairs), largest first onto the least loaded thread: round-robin gave
  // causal S 2048 one thread 72 and the other 64 key tiles' worth of pairs per head.
  std::unique_ptr<int[]> owner(new int[kitems > 0 ? kitems : 1]);
  {
    std::unique_ptr<int64_t[]> cost(new int64_t[kitems > 0 ? kitems : 1]), order(new int64_t[kitems > 0 ? kitems : 1]);
    for (int64_t item = 0; item < kitems; ++item) {
      const int64_t t = item % ktiles.count, b = ktiles.seq[t];
      const SeqMask mask(a.cu_seqlens_q[b + 1] - a.cu_seqlens_q[b], a.cu_seqlens_k[b + 1] - a.cu_seqlens_k[b], a);
      const int64_t j0 = ktiles.row0[t], nk = std::min<int64_t>(kBK, mask.lk - j0);
      cost[item] = nk * std::max<int64_t>(1, mask.last_row(j0 + nk) - mask.first_row(j0));
      order[item] = item;
    }
    std::stable_sort(order.get(), order.get() + kitems, [&](int64_t x, int64_t y) { return cost[x] > cost[y]; });
    std::unique_ptr<int64_t[]> load(new int64_t[nt]());
    for (int64_t i = 0; i < kitems; ++i) {
      int th = 0;
      for (int u = 1; u < nt; ++u)
        if (load[u] < load[th]) th = u;
      owner[order[i]] = th;
      load[th] += cost[order[i]];
    }
  }
#pragma omp parallel num_threads(nt)
  {
    M_* dQacc = nullptr;
    if (dq_in_pass1) {
      const int tid = omp_get_thread_num(), nthr = omp_get_num_threads();
      dQacc = dQpart.get() + int64_t(tid) * part;
      for (int s = tid; s < nt; s += nthr) std::memset(dQpart.get() + int64_t(s) * part, 0, sizeof(M_) * part);
    }
    const bool tiled = kitems > 0;
    // Query rows per products() call: a tile, or at most the longest short sequence (buffers sized to the call,
    // as in the forward).
    const int64_t rows = tiled ? kBQ : std::min<int64_t>(kBQ, std::max<int64_t>(plan.max_lq, 1));
    std::unique_ptr<M_[]> Qb(new M_[tiled ? kBQ * ldr : 1]()), Gb(new M_[tiled ? kBQ * ldr : 1]()),
        Kb(new M_[tiled && dq_in_pass1 ? kBK * ldr : 1]()), Ktb(new M_[tiled ? D * kBKp : 1]()),
        Vtb(new M_[tiled ? D * kBKp : 1]()), Sb(new M_[rows * kBKp]()), dPb(new M_[rows * kBKp]()),
        dKb(new M_[std::max(tiled ? kBK : 0, plan.max_lk) * Dp + 1]()),
        dVb(new M_[std::max(tiled ? kBK : 0, plan.max_lk) * Dp + 1]()), dQb(new M_[plan.max_lq * Dp + 1]()),
        rowb(new M_[Dpn]()), tmpb(new M_[kVW * Dpn]()),
        stageb(plan.count > 0 ? new M_[plan.max_stage_bytes / sizeof(M_) + 1]() : nullptr);
    M_ *Kt = Ktb.get(), *Vt = Vtb.get(), *S = Sb.get(), *dP = dPb.get(), *dK = dKb.get(), *dV = dVb.get();

    // The five products of query rows [i0, i0 + ni) x key rows [j0, j0 + nk) of one (query head, kv head):
    // Q, G (dO) rows ldq apart; Kt_, Vt_ the scaled K^T and V^T at key column j0, ldkt apart; Kr the K rows
    // at j0 (ld Dp; nullptr: no dQ); dK_, dV_ at row j0, dQ_ at row i0 (ld Dp).
    auto products = [&](const SeqMask& mask, int64_t i0, int64_t ni, int64_t j0, int64_t nk, const M_* Q,
                        const M_* G, int64_t ldq, const M_* Kt_, const M_* Vt_, int64_t ldkt, const M_* Kr,
                        int64_t ldkr, const M_* lse_r, const M_* dv_r, M_* dK_, M_* dV_, M_* dQ_) {
      const int64_t nkp = round_up(nk, kNR);
      const bool full = mask.full(i0, i0 + ni, j0, j0 + nk);
      // [ni x nk] products: on a tile the mask crosses, per kNR-wide block of keys only the query rows that see
      // one of them (the causal diagonal's hidden triangle is skipped; probabilities() zeroes the rest of P).
      const auto rows_by_keys = [&](const M_* A, const M_* B, M_* C) {
        if (full) return gemm_tile<M_>(ni, nkp, D, A, ldq, 1, B, ldkt, C, kBKp, false);
        for (int64_t n0 = 0; n0 < nkp; n0 += kNR) {
          const int64_t r0 = std::max<int64_t>(0, mask.first_row(j0 + n0) - i0);
          const int64_t r1 = std::min<int64_t>(ni, mask.last_row(j0 + std::min<int64_t>(nk, n0 + kNR)) - i0);
          if (r1 > r0)
            gemm_tile<M_>(r1 - r0, kNR, D, A + r0 * ldq, ldq, 1, B + n0, ldkt, C + r0 * kBKp + n0, kBKp, false);
        }
      };
      // Accumulating products over the query rows (C rows = keys) or the keys (C rows = query rows): each block of
      // C rows takes only the inner range its rows see (P and dS are 0 elsewhere: exact).
      const auto by_key_rows = [&](int64_t m, int64_t rows, int64_t K, int64_t& k0, int64_t& k1) {
        k0 = full ? 0 : std::max<int64_t>(0, mask.first_row(j0 + m) - i0);
        k1 = full ? K : std::min<int64_t>(K, mask.last_row(j0 + m + rows) - i0);
      };
      const auto by_query_rows = [&](int64_t m, int64_t rows, int64_t K, int64_t& k0, int64_t& k1) {
        k0 = full ? 0 : std::max<int64_t>(0, mask.lo(i0 + m) - j0);
        k1 = full ? K : std::min<int64_t>(K, mask.hi(i0 + m + rows - 1) - j0 + 1);
      };
      rows_by_keys(Q, Kt_, S);
      probabilities<M_>(S, kBKp, lse_r, ni, nk, i0, j0, mask, full);
      gemm_tile<M_>(nk, Dp, ni, S, 1, kBKp, G, ldq, dV_, Dp, true, kNR, nullptr, by_key_rows);  // dV += P^T dO
      rows_by_keys(G, Vt_, dP);                                                                  // dP = dO V^T
      // dS over the keys [lo, hi) the row sees, 0 elsewhere (dP there may hold stale values of blocks
      // rows_by_keys skipped). Written as one select per element, GCC kept this loop scalar: 8% of a
      // [2 x 256, 2 heads, D 16] backward.
      for (int64_t r = 0; r < ni; ++r) {
        M_* d = dP + r * kBKp;
        const M_* p = S + r * kBKp;
        const M_ dvr = dv_r[r];
        const int64_t lo = full ? 0 : std::min<int64_t>(nk, std::max<int64_t>(0, mask.lo(i0 + r) - j0));
        const int64_t hi = full ? nk : std::min<int64_t>(nk, std::max<int64_t>(lo, mask.hi(i0 + r) - j0 + 1));
        for (int64_t c = 0; c < lo; ++c) d[c] = 0;
#pragma omp simd
        for (int64_t c = lo; c < hi; ++c) d[c] = p[c] * (d[c] - dvr);  // dS
        for (int64_t c = hi; c < nk; ++c) d[c] = 0;
      }
      gemm_tile<M_>(nk, Dp, ni, dP, 1, kBKp, Q, ldq, dK_, Dp, true, kNR, nullptr, by_key_rows);  // dK += dS^T Q
      if (Kr)  // dQ += dS K (both scaled on store)
        gemm_tile<M_>(ni, Dp, nk, dP, kBKp, 1, Kr, ldkr, dQ_, Dp, true, kNR, nullptr, by_query_rows);
    };

    const int tid = omp_get_thread_num(), nthr = omp_get_num_threads();
    for (int64_t item = 0; item < kitems; ++item) {
      if (owner[item] % nthr != tid) continue;  // in item order (head-major) within a thread
      const int64_t t = item % ktiles.count, hk = item / ktiles.count, b = ktiles.seq[t];
      const int64_t q0 = a.cu_seqlens_q[b], k0 = a.cu_seqlens_k[b];
      const SeqMask mask(a.cu_seqlens_q[b + 1] - q0, a.cu_seqlens_k[b + 1] - k0, a);
      const int64_t j0 = ktiles.row0[t], nk = std::min<int64_t>(kBK, mask.lk - j0);
      load_rows_transposed<T, M_>(k, k0 + j0, nk, Hk, hk, D, Kt, kBKp, tmpb.get(), scale);
      load_rows_transposed<T, M_>(v, k0 + j0, nk, Hk, hk, D, Vt, kBKp, tmpb.get(), M_(1));
      if (dq_in_pass1) load_rows<T, M_>(k, k0 + j0, nk, Hk, hk, D, Kb.get(), ldr, M_(1));
      std::memset(dK, 0, sizeof(M_) * nk * Dp);
      std::memset(dV, 0, sizeof(M_) * nk * Dp);
      const int64_t ibeg = mask.first_row(j0), iend = mask.last_row(j0 + nk);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h)
        for (int64_t i0 = ibeg; i0 < iend; i0 += kBQ) {
          const int64_t ni = std::min<int64_t>(kBQ, iend - i0);
          const int64_t lr = h * Tl + lrow[b] + i0;
          const M_ *Qt = Qb.get(), *Gt = Gb.get();
          if (qg_packed) {
            Qt = Qpk.get() + lr * ldr;
            Gt = Gpk.get() + lr * ldr;
          } else {
            load_rows<T, M_>(q, q0 + i0, ni, Hq, h, D, Qb.get(), ldr, M_(1));
            load_rows<T, M_>(dout, q0 + i0, ni, Hq, h, D, Gb.get(), ldr, M_(1));
          }
          products(mask, i0, ni, j0, nk, Qt, Gt, ldr, Kt, Vt, kBKp, dq_in_pass1 ? Kb.get() : nullptr, ldr,
                   lse + h * Tq + q0 + i0, Dv.get() + lr, dK, dV, dq_in_pass1 ? dQacc + lr * Dp : nullptr);
        }
      store_rows<T, M_>(dK, Dp, k0 + j0, nk, Hk, hk, D, dk, scale);
      store_rows<T, M_>(dV, Dp, k0 + j0, nk, Hk, hk, D, dv, M_(1));
    }

    // Short sequences: every row of the item's heads is finished here, so no partials and any schedule is
    // deterministic.
#pragma omp for schedule(dynamic, 1)
    for (int64_t s = 0; s < plan.count; ++s) {
      const int64_t b = plan.seq[s], hk0 = plan.hk0[s];
      const int64_t hk1 = std::min<int64_t>(Hk, hk0 + plan.chunk[b]), hq0 = hk0 * group, hq1 = hk1 * group;
      const int64_t q0 = a.cu_seqlens_q[b], k0 = a.cu_seqlens_k[b];
      const SeqMask mask(a.cu_seqlens_q[b + 1] - q0, a.cu_seqlens_k[b + 1] - k0, a);
      const int64_t lq = mask.lq, lk = mask.lk, lkp = round_up(lk, kNR);
      const int64_t sqg = stage_qg(lq), sdv = stage_dv(lq), skt = stage_kt(lk), skr = stage_kr(lk);
      M_* Qs = stageb.get();              // [hq1 - hq0][lq x Dp]
      M_* Gs = Qs + (hq1 - hq0) * sqg;    // [hq1 - hq0][lq x Dp]
      M_* Dvs = Gs + (hq1 - hq0) * sqg;   // [hq1 - hq0][lq]
      M_* Kts = Dvs + (hq1 - hq0) * sdv;  // [hk1 - hk0][D x lkp], scaled
      M_* Vts = Kts + (hk1 - hk0) * skt;  // [hk1 - hk0][D x lkp]
      M_* Krs = Vts + (hk1 - hk0) * skt;  // [hk1 - hk0][lk x Dp]
      M_* dQs = Krs + (hk1 - hk0) * skr;  // [lq][hq1 - hq0][D]: the gradients, token-major
      M_* dKs = dQs + lq * (hq1 - hq0) * D;  // [lk][hk1 - hk0][D]
      M_* dVs = dKs + lk * (hk1 - hk0) * D;  // [lk][hk1 - hk0][D]
      const auto unstage = [&](const M_* acc, int64_t n, M_* dst, int64_t ld) {
        for (int64_t r = 0; r < n; ++r) copy_row<M_>(acc + r * Dp, dst + r * ld, D);
      };
      for_row_blocks_of_heads(k, k0, lk, Hk, hk0, hk1, D, [&](int64_t r, int64_t hl, const T* rows, int64_t lds, int64_t n) {
        put_rows_transposed<T, M_>(rows, lds, n, D, Kts + hl * skt + r, lkp, tmpb.get(), scale);
        for (int64_t i = 0; i < n; ++i) put_row<T, M_>(rows + i * lds, D, Krs + hl * skr + (r + i) * Dp, M_(1));
      });
      for_row_blocks_of_heads(v, k0, lk, Hk, hk0, hk1, D, [&](int64_t r, int64_t hl, const T* rows, int64_t lds, int64_t n) {
        put_rows_transposed<T, M_>(rows, lds, n, D, Vts + hl * skt + r, lkp, tmpb.get(), M_(1));
      });
      for_rows_of_heads(q, q0, lq, Hq, hq0, hq1, D, [&](int64_t r, int64_t hl, const T* row) {
        put_row<T, M_>(row, D, Qs + hl * sqg + r * Dp, M_(1));
      });
      for_rows_of_heads(dout, q0, lq, Hq, hq0, hq1, D, [&](int64_t r, int64_t hl, const T* row) {
        put_row<T, M_>(row, D, Gs + hl * sqg + r * Dp, M_(1));
      });
      for_rows_of_heads(out, q0, lq, Hq, hq0, hq1, D, [&](int64_t r, int64_t hl, const T* row) {
        const M_* g = Gs + hl * sqg + r * Dp;
        copy_row<T>(row, rowb.get(), D);
        const M_* o = rowb.get();
        M_ sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t c = 0; c < D; ++c) sum += o[c] * g[c];
        Dvs[hl * sdv + r] = dlse ? sum - dlse[(hq0 + hl) * Tq + q0 + r] : sum;
      });
      M_* dQ = dQb.get();
      for (int64_t hk = hk0; hk < hk1; ++hk) {
        const M_ *Kth = Kts + (hk - hk0) * skt, *Vth = Vts + (hk - hk0) * skt, *Krh = Krs + (hk - hk0) * skr;
        std::memset(dK, 0, sizeof(M_) * lk * Dp);
        std::memset(dV, 0, sizeof(M_) * lk * Dp);
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          const M_ *Qh = Qs + (h - hq0) * sqg, *Gh = Gs + (h - hq0) * sqg, *Dvh = Dvs + (h - hq0) * sdv;
          std::memset(dQ, 0, sizeof(M_) * lq * Dp);
          for (int64_t j0 = 0; j0 < lk; j0 += kBK) {
            const int64_t nk = std::min<int64_t>(kBK, lk - j0);
            const int64_t ibeg = mask.first_row(j0), iend = mask.last_row(j0 + nk);
            for (int64_t i0 = ibeg; i0 < iend; i0 += kBQ)
              products(mask, i0, std::min<int64_t>(kBQ, iend - i0), j0, nk, Qh + i0 * Dp, Gh + i0 * Dp, Dp,
                       Kth + j0, Vth + j0, lkp, Krh + j0 * Dp, Dp, lse + h * Tq + q0 + i0, Dvh + i0, dK + j0 * Dp,
                       dV + j0 * Dp, dQ + i0 * Dp);
          }
          unstage(dQ, lq, dQs + (h - hq0) * D, (hq1 - hq0) * D);
        }
        unstage(dK, lk, dKs + (hk - hk0) * D, (hk1 - hk0) * D);
        unstage(dV, lk, dVs + (hk - hk0) * D, (hk1 - hk0) * D);
      }
      store_rows_of_heads<T, M_>(dQs, q0, lq, Hq, hq0, hq1, D, dq, scale);
      store_rows_of_heads<T, M_>(dKs, k0, lk, Hk, hk0, hk1, D, dk, scale);
      store_rows_of_heads<T, M_>(dVs, k0, lk, Hk, hk0, hk1, D, dv, M_(1));
    }
  }
  if (dq_in_pass1) {
#pragma omp parallel num_threads(nt)
    {
      std::unique_ptr<M_[]> accb(new M_[Dp]);
      M_* acc = accb.get();
#pragma omp for schedule(static)
      for (int64_t row = 0; row < Tl * Hq; ++row) {
        const M_* p0 = dQpart.get() + row * Dp;
        std::memcpy(acc, p0, sizeof(M_) * Dp);
        for (int th = 1; th < nt; ++th) {
          const M_* p = p0 + th * part;
#pragma omp simd
          for (int64_t c = 0; c < Dp; ++c) acc[c] += p[c];
        }
        store_rows<T, M_>(acc, Dp, glob[row % Tl], 1, Hq, row / Tl, D, dq, scale);
      }
    }
    return;
  }
  if (Tl == 0) return;

  // Pass 2: dQ per (sequence, query head, query tile).
  const int64_t qitems = qtiles.count * Hq;
#pragma omp parallel num_threads(nt)
  {
    std::unique_ptr<M_[]> Qb(new M_[kBQ * ldr]()), Gb(new M_[kBQ * ldr]()), Ktb(new M_[D * kBKp]()),
        Kb(new M_[kBK * ldr]()), Vtb(new M_[D * kBKp]()), Sb(new M_[kBQ * kBKp]()), dPb(new M_[kBQ * kBKp]()),
        dQb(new M_[kBQ * Dp]()), tmpb(new M_[kVW * Dpn]());
    M_ *Q = Qb.get(), *G = Gb.get(), *Kt = Ktb.get(), *K = Kb.get(), *Vt = Vtb.get(), *S = Sb.get(),
       *dP = dPb.get(), *dQ = dQb.get();
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < qitems; ++item) {
      const int64_t t = item / Hq, h = item % Hq, hk = h / group, b = qtiles.seq[t];
      const int64_t q0 = a.cu_seqlens_q[b], k0 = a.cu_seqlens_k[b];
      const SeqMask mask(a.cu_seqlens_q[b + 1] - q0, a.cu_seqlens_k[b + 1] - k0, a);
      const int64_t i0 = qtiles.row0[t], ni = std::min<int64_t>(kBQ, mask.lq - i0);
      load_rows<T, M_>(q, q0 + i0, ni, Hq, h, D, Q, ldr, scale);
      load_rows<T, M_>(dout, q0 + i0, ni, Hq, h, D, G, ldr, M_(1));
      std::memset(dQ, 0, sizeof(M_) * ni * Dp);
      const M_* lse_r = lse + h * Tq + q0 + i0;
      const M_* dv_r = Dv.get() + h * Tl + lrow[b] + i0;
      const int64_t kbeg = mask.lo(i0), kend = mask.hi(i0 + ni - 1) + 1;
      for (int64_t j0 = kbeg; j0 < kend; j0 += kBK) {
        const int64_t nk = std::min<int64_t>(kBK, kend - j0), nkp = round_up(nk, kNR);
        const bool full = mask.full(i0, i0 + ni, j0, j0 + nk);
        load_rows_transposed<T, M_>(k, k0 + j0, nk, Hk, hk, D, Kt, kBKp, tmpb.get(), M_(1));
        load_rows<T, M_>(k, k0 + j0, nk, Hk, hk, D, K, ldr, M_(1));
        load_rows_transposed<T, M_>(v, k0 + j0, nk, Hk, hk, D, Vt, kBKp, tmpb.get(), M_(1));
        gemm_tile<M_>(ni, nkp, D, Q, ldr, 1, Kt, kBKp, S, kBKp, false);
        probabilities<M_>(S, kBKp, lse_r, ni, nk, i0, j0, mask, full);
        gemm_tile<M_>(ni, nkp, D, G, ldr, 1, Vt, kBKp, dP, kBKp, false);
        for (int64_t r = 0; r < ni; ++r) {
          M_* d = dP + r * kBKp;
          const M_* p = S + r * kBKp;
          const M_ dvr = dv_r[r];
#pragma omp simd
          for (int64_t c = 0; c < nk; ++c) d[c] = p[c] * (d[c] - dvr);
        }
        gemm_tile<M_>(ni, Dp, nk, dP, kBKp, 1, K, ldr, dQ, Dp, true);  // dQ += dS K
      }
      store_rows<T, M_>(dQ, Dp, q0 + i0, ni, Hq, h, D, dq, scale);
    }
  }
}

}  // namespace

void attention_fwd(const AttentionFwdArgs& a) {
  if (a.total_q == 0 || a.heads_q == 0 || a.dim == 0) return;
  dispatch_dtype(a.dtype, "attention_fwd", [&](auto tag) { fwd_kernel<decltype(tag)>(a); });
}

void attention_bwd(const AttentionBwdArgs& a) {
  if ((a.total_q == 0 && a.total_k == 0) || a.heads_q == 0 || a.dim == 0) return;
  dispatch_dtype(a.dtype, "attention_bwd", [&](auto tag) { bwd_kernel<decltype(tag)>(a); });
}

}  // namespace MMFUSE_ISA_NS
}  // namespace mmfuse
