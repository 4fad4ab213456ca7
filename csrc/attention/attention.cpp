// Flash-style attention, forward and backward (compiled once per ISA flavour).
//
// Forward (FlashAttention-2): one work item per (sequence, query head, query tile of kFQ rows),
// head-major so that concurrent items share one head's K/V in cache. The query tile is packed once,
// transposed and pre-multiplied by the softmax scale, in kNR-wide panels; the key/value tiles of kFK
// rows that the mask leaves visible are streamed through it with an online softmax computed on the
// transposed scores: S^T = K Q^T (K rows copied contiguous, no per-tile transpose), running max m and
// sum l per query row (vectorised across query rows), O = O * e^(m_old - m_new) + P V with P read
// transposed and V packed in panels. Tiles that the mask hides completely (causal, window, other
// sequences) are never visited; only tiles crossing a mask edge are masked element by element.
// out = O / l and lse = m + log(l) are written once.
//
// Backward recomputes P = exp(S - lse) tile by tile; with Dv_i = rowsum(dO * O)_i - dlse_i:
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - Dv),  dQ = scale dS K,  dK = scale dS^T Q.
// Pass 1: one work item per (sequence, kv head, key tile of kBK rows) accumulates dK and dV over the
// query tiles (kBQ rows) of every query head in its GQA group, and dQ += dS K into a private
// [Hq, Tq, Dp] buffer per thread; the buffers are summed afterwards (5 tile products, the minimum).
// When those nt buffers would exceed kMaxPartialBytes, pass 1 skips dQ and pass 2 (one item per
// (sequence, query head, query tile)) accumulates it instead, recomputing S and dP (7 products).
// The softmax scale is folded into the K^T tile once per item.
//
// Products go through one register-blocked micro-kernel (gemm_tile): kMR rows x kNR columns of C
// (12 rows x 32 floats with AVX-512, 6 rows x 2 vectors otherwise) live in vector registers over the whole inner
// dimension; the column operand is read as kNR-wide blocks (plain rows or panel-packed), head dims
// are padded to a multiple of kNR with zeros. Tiles are copied out of the [T, H, D] inputs (rows read
// in place are H * D apart, a page each, and TLB misses dominated).
//
// Dense fp32, S = 2048, H = 16, D = 128, 2 threads (Sapphire Rapids, AVX-512), p50 ms / GFLOP/s
// (FlashAttention convention) / ratio to PyTorch CPU SDPA measured in the same run
// (python -m bench.ops.bench_attention; before = the previous kernel rerun back to back with this one):
//                     before                      after
//   fwd              326.8 ms 105 GF/s 0.41x      161.6 ms 213 GF/s 0.84x
//   fwd+bwd         1168.3 ms 103 GF/s 0.43x      564.3 ms 213 GF/s 0.93x
//   causal fwd       149.8 ms 115 GF/s 0.58x       92.2 ms 186 GF/s 0.93x
//   causal fwd+bwd   550.8 ms 109 GF/s 0.63x      326.3 ms 184 GF/s 1.04x
// Run-to-run noise on this machine is about +-10%.
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
constexpr int64_t kFQ = 384;  // forward: query rows per tile (a multiple of kNR)
constexpr int64_t kFK = 144;  // forward: key rows per tile
constexpr int64_t kMaxPartialBytes = int64_t(512) << 20;  // backward: per-thread dQ buffers, all threads

#if defined(__AVX512F__)
constexpr int kVW = 16;
#elif defined(__AVX2__)
constexpr int kVW = 8;
#else
constexpr int kVW = 4;  // SSE2 / NEON
#endif
constexpr int kNR = 2 * kVW;  // columns of C per micro-kernel call: two vectors
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

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// C[R x kNR] (+)= A[R x K] B[K x kNR]; A's element (r, kk) is at A[r * ars + kk * aks] (so A may be
// read transposed), B rows are ldb apart, C rows ldc apart.
template <int R>
inline void micro_kernel(int64_t K, const float* A, int64_t ars, int64_t aks, const float* B, int64_t ldb,
                         float* C, int64_t ldc, bool accumulate) {
  vecf c0[R], c1[R];
  for (int r = 0; r < R; ++r) {
    if (accumulate) {
      c0[r] = vload(C + r * ldc);
      c1[r] = vload(C + r * ldc + kVW);
    } else {
      c0[r] = vecf{};
      c1[r] = vecf{};
    }
  }
  for (int64_t kk = 0; kk < K; ++kk) {
    const vecf b0 = vload(B + kk * ldb), b1 = vload(B + kk * ldb + kVW);
    const float* a = A + kk * aks;
    for (int r = 0; r < R; ++r) {
      const float ar = a[r * ars];  // scalar * vector: one broadcast ({1to16} operand with AVX-512)
      c0[r] += ar * b0;
      c1[r] += ar * b1;
    }
  }
  for (int r = 0; r < R; ++r) {
    vstore(C + r * ldc, c0[r]);
    vstore(C + r * ldc + kVW, c1[r]);
  }
}

// micro_kernel<rows> for 1 <= rows <= R.
template <int R>
inline void micro_kernel_tail(int64_t rows, int64_t K, const float* A, int64_t ars, int64_t aks, const float* B,
                              int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if constexpr (R > 0) {
    if (rows == R)
      micro_kernel<R>(K, A, ars, aks, B, ldb, C, ldc, accumulate);
    else
      micro_kernel_tail<R - 1>(rows, K, A, ars, aks, B, ldb, C, ldc, accumulate);
  }
}

// C[M x N] (+)= A[M x K] B[K x N] with N a multiple of kNR (callers pad B and C with zeros).
// Column block n0 / kNR of B starts bps floats after the previous one (kNR for a plain row-major B;
// panel-packed operands store each kNR-wide block contiguously over K, bps = K * kNR, ldb = kNR).
template <typename M_>
void gemm_tile(int64_t M, int64_t N, int64_t K, const M_* A, int64_t ars, int64_t aks, const M_* B, int64_t ldb,
               M_* C, int64_t ldc, bool accumulate, int64_t bps = kNR) {
  if constexpr (std::is_same_v<M_, float>) {
    for (int64_t n0 = 0; n0 < N; n0 += kNR, B += bps - kNR) {
      int64_t m = 0;
      for (; m + kMR <= M; m += kMR)
        micro_kernel<kMR>(K, A + m * ars, ars, aks, B + n0, ldb, C + m * ldc + n0, ldc, accumulate);
      if (m < M) micro_kernel_tail<kMR - 1>(M - m, K, A + m * ars, ars, aks, B + n0, ldb, C + m * ldc + n0, ldc, accumulate);
    }
  } else {  // fp64 (gradcheck only): plain loops
    for (int64_t m = 0; m < M; ++m) {
      M_* c = C + m * ldc;
      if (!accumulate)
        for (int64_t n = 0; n < N; ++n) c[n] = 0;
      for (int64_t n0 = 0; n0 < N; n0 += kNR) {
        const int64_t nb = std::min<int64_t>(kNR, N - n0);
        for (int64_t kk = 0; kk < K; ++kk) {
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

// Work items over (sequence, tile): tile t of the flattened list covers rows [row0, row0 + n) of
// sequence seq. Built once per call; O(total tiles) memory.
struct TileList {
  std::unique_ptr<int64_t[]> seq, row0;
  int64_t count = 0;
  TileList(const int32_t* cu, int64_t batch, int64_t tile) {
    for (int64_t b = 0; b < batch; ++b) count += (cu[b + 1] - cu[b] + tile - 1) / tile;
    seq.reset(new int64_t[count > 0 ? count : 1]);
    row0.reset(new int64_t[count > 0 ? count : 1]);
    int64_t t = 0;
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t r = 0; r < cu[b + 1] - cu[b]; r += tile) {
        seq[t] = b;
        row0[t] = r;
        ++t;
      }
  }
};

// Load rows [r0, r0 + n) of head h of a [T, H, D] tensor into dst [n x ld] in the math type
// (times `mul`); columns D .. ld stay as they are (zero from allocation).
template <typename T, typename M_>
void load_rows(const T* src, int64_t r0, int64_t n, int64_t H, int64_t h, int64_t D, M_* dst, int64_t ld, M_ mul) {
  for (int64_t r = 0; r < n; ++r) {
    const T* s = src + ((r0 + r) * H + h) * D;
    M_* d = dst + r * ld;
    load_row<T>(s, d, D);
    if (mul != M_(1)) {
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) d[c] *= mul;
    }
  }
}

// Transposed: dst[c * ld + r] = src row r, column c, for r < n (columns n .. ld keep zeros or stale
// values of earlier tiles; the callers never read them).
template <typename T, typename M_>
void load_rows_transposed(const T* src, int64_t r0, int64_t n, int64_t H, int64_t h, int64_t D, M_* dst, int64_t ld,
                          M_* row_buf) {
  for (int64_t r = 0; r < n; ++r) {
    load_row<T>(src + ((r0 + r) * H + h) * D, row_buf, D);
    for (int64_t c = 0; c < D; ++c) dst[c * ld + r] = row_buf[c];
  }
}

// Panel-packed rows: element (r, c) of rows [r0, r0 + n) goes to dst[(c / kNR) * n * kNR + r * kNR + c % kNR]
// for c < Dp (columns D .. Dp zero), so a micro-kernel column block reads n * kNR contiguous floats.
template <typename T, typename M_>
void pack_rows(const T* src, int64_t r0, int64_t n, int64_t H, int64_t h, int64_t D, int64_t Dp, M_* dst,
               M_* row_buf) {
  for (int64_t c = D; c < Dp; ++c) row_buf[c] = 0;
  for (int64_t r = 0; r < n; ++r) {
    load_row<T>(src + ((r0 + r) * H + h) * D, row_buf, D);
    for (int64_t p = 0; p < Dp; p += kNR) {
      if constexpr (std::is_same_v<M_, float>) {
        vstore(dst + p * n + r * kNR, vload(row_buf + p));
        vstore(dst + p * n + r * kNR + kVW, vload(row_buf + p + kVW));
      } else {
        std::memcpy(dst + p * n + r * kNR, row_buf + p, sizeof(M_) * kNR);
      }
    }
  }
}

// Panel-packed transpose (times mul): element (r, c) goes to dst[(r / kNR) * D * kNR + c * kNR + r % kNR].
template <typename T, typename M_>
void pack_rows_transposed(const T* src, int64_t r0, int64_t n, int64_t H, int64_t h, int64_t D, M_* dst,
                          M_* row_buf, M_ mul) {
  for (int64_t r = 0; r < n; ++r) {
    load_row<T>(src + ((r0 + r) * H + h) * D, row_buf, D);
    M_* d = dst + (r / kNR) * D * kNR + r % kNR;
    for (int64_t c = 0; c < D; ++c) d[c * kNR] = row_buf[c] * mul;
  }
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
#pragma omp simd
    for (int64_t c = 0; c < nk; ++c) s[c] = exp_or_zero(s[c] - l);
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
  const int64_t Dp = round_up(D, kNR);
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  T* out = static_cast<T*>(a.out);
  M_* lse_out = static_cast<M_*>(a.lse);
  const M_ scale = static_cast<M_>(a.scale);
  const M_ ninf = -std::numeric_limits<M_>::infinity();
  const TileList tiles(a.cu_seqlens_q, a.batch, kFQ);
  const int64_t items = tiles.count * Hq;
  const int nt = resolve_threads(a.num_threads, items, a.total_q * Hq * D * int64_t(sizeof(T)) * 4);

#pragma omp parallel num_threads(nt)
  {
    std::unique_ptr<M_[]> Qtb(new M_[Dp * kFQ]()), Kb(new M_[kFK * Dp]()),
        Vb(new M_[kFK * Dp]()), Stb(new M_[kFK * kFQ]()), Ob(new M_[kFQ * Dp]()), mb(new M_[kFQ]),
        lb(new M_[kFQ]), mxb(new M_[kFQ]), mub(new M_[kFQ]), smb(new M_[kFQ]), rowb(new M_[Dp]);
    M_ *Qt = Qtb.get(), *St = Stb.get(), *O = Ob.get(), *m = mb.get(), *l = lb.get(), *mx = mxb.get(),
       *mu = mub.get(), *sm = smb.get();
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t t = item % tiles.count, h = item / tiles.count, hk = h / group, b = tiles.seq[t];
      const int64_t q0 = a.cu_seqlens_q[b], k0 = a.cu_seqlens_k[b];
      const SeqMask mask(a.cu_seqlens_q[b + 1] - q0, a.cu_seqlens_k[b + 1] - k0, a);
      const int64_t i0 = tiles.row0[t], ni = std::min<int64_t>(kFQ, mask.lq - i0), nip = round_up(ni, kNR);
      // Q^T (scaled) once per item: S^T = K Q^T needs no per-key-tile transpose.
      pack_rows_transposed<T, M_>(q, q0 + i0, ni, Hq, h, D, Qt, rowb.get(), scale);
      for (int64_t r = 0; r < ni; ++r) {
        m[r] = ninf;
        l[r] = 0;
      }
      std::memset(O, 0, sizeof(M_) * ni * Dp);
      const int64_t kbeg = mask.lo(i0), kend = mask.hi(i0 + ni - 1) + 1;
      for (int64_t j0 = kbeg; j0 < kend; j0 += kFK) {
        const int64_t nk = std::min<int64_t>(kFK, kend - j0);
        const bool full = mask.full(i0, i0 + ni, j0, j0 + nk);
        // K rows copied to a contiguous tile: read in place (rows Hk * D apart), every row is on another page.
        load_rows<T, M_>(k, k0 + j0, nk, Hk, hk, D, Kb.get(), Dp, M_(1));
        const M_* Kp = Kb.get();
        const int64_t ldk = Dp;
        pack_rows<T, M_>(v, k0 + j0, nk, Hk, hk, D, Dp, Vb.get(), rowb.get());
        // Query rows [0, rs) see no key of this tile (causal / right window: a prefix of the tile); rs is
        // a multiple of kNR so that the S^T product starts at a Q^T panel.
        const int64_t rs = std::min<int64_t>(ni, std::max<int64_t>(0, mask.first_row(j0) - i0)) / kNR * kNR;
        gemm_tile<M_>(nk, nip - rs, D, Kp, ldk, 1, Qt + rs * D, kNR, St + rs, kFQ, false, D * kNR);  // S^T [nk x ni]
        if (!full) {
          for (int64_t r = rs; r < ni; ++r) {
            const int64_t lo = mask.lo(i0 + r) - j0, hi = mask.hi(i0 + r) - j0;
            for (int64_t c = 0; c < nk; ++c)
              if (c < lo || c > hi) St[c * kFQ + r] = ninf;
          }
        }
        // Column (= query row) maxima and sums, vectorised over the query rows.
        for (int64_t r = rs; r < ni; ++r) mx[r] = m[r];
        for (int64_t c = 0; c < nk; ++c) {
          const M_* s = St + c * kFQ;
#pragma omp simd
          for (int64_t r = rs; r < ni; ++r) mx[r] = s[r] > mx[r] ? s[r] : mx[r];
        }
#pragma omp simd
        for (int64_t r = rs; r < ni; ++r) {
          mu[r] = mx[r] == ninf ? M_(0) : mx[r];  // nothing visible yet: every P entry is exp(-inf) = 0
          sm[r] = 0;
        }
        for (int64_t c = 0; c < nk; ++c) {
          M_* s = St + c * kFQ;
#pragma omp simd
          for (int64_t r = rs; r < ni; ++r) {
            const M_ p = exp_or_zero(s[r] - mu[r]);
            s[r] = p;
            sm[r] += p;
          }
        }
        for (int64_t r = rs; r < ni; ++r) {
          if (m[r] != mx[r]) {
            const M_ alpha = std::exp(m[r] - mx[r]);  // 0 for the first visible tile
            M_* o = O + r * Dp;
#pragma omp simd
            for (int64_t c = 0; c < D; ++c) o[c] *= alpha;
            l[r] = l[r] * alpha + sm[r];
            m[r] = mx[r];
          } else {
            l[r] += sm[r];
          }
        }
        gemm_tile<M_>(ni - rs, Dp, nk, St + rs, 1, kFQ, Vb.get(), kNR, O + rs * Dp, Dp, true, nk * kNR);  // O += P V
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
        lse_out[h * a.total_q + q0 + i0 + r] = l[r] > 0 ? m[r] + std::log(l[r]) : ninf;
      }
      store_rows<T, M_>(O, Dp, q0 + i0, ni, Hq, h, D, out, M_(1));
    }
  }
}

template <typename T>
void bwd_kernel(const AttentionBwdArgs& a) {
  using M_ = math_t<T>;
  const int64_t D = a.dim, Hq = a.heads_q, Hk = a.heads_k, group = Hq / Hk, Tq = a.total_q;
  const int64_t Dp = round_up(D, kNR);
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

  // Dv [Hq, Tq] = rowsum(dO * O) - dlse: O(T H) memory.
  std::unique_ptr<M_[]> Dv(new M_[Hq * Tq > 0 ? Hq * Tq : 1]);
#pragma omp parallel num_threads(nt)
  {
    std::unique_ptr<M_[]> ob(new M_[D]), gb(new M_[D]);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < Tq; ++t)
      for (int64_t h = 0; h < Hq; ++h) {
        load_row<T>(out + (t * Hq + h) * D, ob.get(), D);
        load_row<T>(dout + (t * Hq + h) * D, gb.get(), D);
        const M_ *o = ob.get(), *g = gb.get();
        M_ s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t c = 0; c < D; ++c) s += o[c] * g[c];
        Dv[h * Tq + t] = dlse ? s - dlse[h * Tq + t] : s;
      }
  }

  // Pass 1: dK, dV per (sequence, kv head, key tile). The softmax scale is folded into K^T (once
  // per item), so the Q and dO tiles are plain copies (contiguous: rows read in place are a page apart).
  // When nt private [Hq, Tq, Dp] buffers fit in kMaxPartialBytes, dQ += dS K is accumulated here too
  // (summed over the threads afterwards) and pass 2 is skipped.
  const int64_t part = Tq * Hq * Dp;
  const bool dq_in_pass1 = Tq > 0 && int64_t(nt) * part * int64_t(sizeof(M_)) <= kMaxPartialBytes;
  std::unique_ptr<M_[]> dQpart(dq_in_pass1 ? new M_[nt * part] : nullptr);
  const TileList ktiles(a.cu_seqlens_k, a.batch, kBK);
  const int64_t kitems = ktiles.count * Hk;
#pragma omp parallel num_threads(nt)
  {
    M_* dQacc = nullptr;
    if (dq_in_pass1) {
      const int tid = omp_get_thread_num(), nthr = omp_get_num_threads();
      dQacc = dQpart.get() + int64_t(tid) * part;
      for (int s = tid; s < nt; s += nthr) std::memset(dQpart.get() + int64_t(s) * part, 0, sizeof(M_) * part);
    }
    std::unique_ptr<M_[]> Qb(new M_[kBQ * Dp]()), Gb(new M_[kBQ * Dp]()), Kb(new M_[dq_in_pass1 ? kBK * Dp : 1]()), Ktb(new M_[Dp * kBK]()), Vtb(new M_[Dp * kBK]()),
        Sb(new M_[kBQ * kBK]()), dPb(new M_[kBQ * kBK]()), dKb(new M_[kBK * Dp]()), dVb(new M_[kBK * Dp]()),
        rowb(new M_[Dp]);
    M_ *Kt = Ktb.get(), *Vt = Vtb.get(), *S = Sb.get(), *dP = dPb.get(), *dK = dKb.get(), *dV = dVb.get();
    // static round-robin, not dynamic: which thread's dQ partial an item lands in must not depend
    // on timing, or the dQ sum changes in its last bits from run to run (and exact resume breaks).
#pragma omp for schedule(static, 1)
    for (int64_t item = 0; item < kitems; ++item) {
      const int64_t t = item % ktiles.count, hk = item / ktiles.count, b = ktiles.seq[t];
      const int64_t q0 = a.cu_seqlens_q[b], k0 = a.cu_seqlens_k[b];
      const SeqMask mask(a.cu_seqlens_q[b + 1] - q0, a.cu_seqlens_k[b + 1] - k0, a);
      const int64_t j0 = ktiles.row0[t], nk = std::min<int64_t>(kBK, mask.lk - j0), nkp = round_up(nk, kNR);
      load_rows_transposed<T, M_>(k, k0 + j0, nk, Hk, hk, D, Kt, kBK, rowb.get());
      for (int64_t c = 0; c < D; ++c) {
        M_* kc = Kt + c * kBK;
#pragma omp simd
        for (int64_t r = 0; r < nk; ++r) kc[r] *= scale;
      }
      load_rows_transposed<T, M_>(v, k0 + j0, nk, Hk, hk, D, Vt, kBK, rowb.get());
      const M_* Kr = Kb.get();
      const int64_t ldk = Dp;
      if (dq_in_pass1) load_rows<T, M_>(k, k0 + j0, nk, Hk, hk, D, Kb.get(), Dp, M_(1));
      std::memset(dK, 0, sizeof(M_) * nk * Dp);
      std::memset(dV, 0, sizeof(M_) * nk * Dp);
      const int64_t ibeg = mask.first_row(j0), iend = mask.last_row(j0 + nk);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h)
        for (int64_t i0 = ibeg; i0 < iend; i0 += kBQ) {
          const int64_t ni = std::min<int64_t>(kBQ, iend - i0);
          const bool full = mask.full(i0, i0 + ni, j0, j0 + nk);
          load_rows<T, M_>(q, q0 + i0, ni, Hq, h, D, Qb.get(), Dp, M_(1));
          load_rows<T, M_>(dout, q0 + i0, ni, Hq, h, D, Gb.get(), Dp, M_(1));
          const M_ *Q = Qb.get(), *G = Gb.get();
          const int64_t ldq = Dp;
          const M_* lse_r = lse + h * Tq + q0 + i0;
          const M_* dv_r = Dv.get() + h * Tq + q0 + i0;
          gemm_tile<M_>(ni, nkp, D, Q, ldq, 1, Kt, kBK, S, kBK, false);
          probabilities<M_>(S, kBK, lse_r, ni, nk, i0, j0, mask, full);
          gemm_tile<M_>(nk, Dp, ni, S, 1, kBK, G, ldq, dV, Dp, true);      // dV += P^T dO
          gemm_tile<M_>(ni, nkp, D, G, ldq, 1, Vt, kBK, dP, kBK, false);   // dP = dO V^T
          for (int64_t r = 0; r < ni; ++r) {
            M_* d = dP + r * kBK;
            const M_* p = S + r * kBK;
            const M_ dvr = dv_r[r];
#pragma omp simd
            for (int64_t c = 0; c < nk; ++c) d[c] = p[c] * (d[c] - dvr);
          }
          gemm_tile<M_>(nk, Dp, ni, dP, 1, kBK, Q, ldq, dK, Dp, true);     // dK += dS^T Q (scaled on store)
          if (dq_in_pass1)                                                 // dQ += dS K (scaled on store)
            gemm_tile<M_>(ni, Dp, nk, dP, kBK, 1, Kr, ldk, dQacc + (h * Tq + q0 + i0) * Dp, Dp, true);
        }
      store_rows<T, M_>(dK, Dp, k0 + j0, nk, Hk, hk, D, dk, scale);
      store_rows<T, M_>(dV, Dp, k0 + j0, nk, Hk, hk, D, dv, M_(1));
    }
  }
  if (dq_in_pass1) {
#pragma omp parallel num_threads(nt)
    {
      std::unique_ptr<M_[]> accb(new M_[Dp]);
      M_* acc = accb.get();
#pragma omp for schedule(static)
      for (int64_t row = 0; row < Tq * Hq; ++row) {
        const M_* p0 = dQpart.get() + row * Dp;
        std::memcpy(acc, p0, sizeof(M_) * Dp);
        for (int th = 1; th < nt; ++th) {
          const M_* p = p0 + th * part;
#pragma omp simd
          for (int64_t c = 0; c < Dp; ++c) acc[c] += p[c];
        }
        store_rows<T, M_>(acc, Dp, row % Tq, 1, Hq, row / Tq, D, dq, scale);
      }
    }
    return;
  }

  // Pass 2: dQ per (sequence, query head, query tile).
  const TileList qtiles(a.cu_seqlens_q, a.batch, kBQ);
  const int64_t qitems = qtiles.count * Hq;
#pragma omp parallel num_threads(nt)
  {
    std::unique_ptr<M_[]> Qb(new M_[kBQ * Dp]()), Gb(new M_[kBQ * Dp]()), Ktb(new M_[Dp * kBK]()),
        Kb(new M_[kBK * Dp]()), Vtb(new M_[Dp * kBK]()), Sb(new M_[kBQ * kBK]()), dPb(new M_[kBQ * kBK]()),
        dQb(new M_[kBQ * Dp]()), rowb(new M_[Dp]);
    M_ *Q = Qb.get(), *G = Gb.get(), *Kt = Ktb.get(), *K = Kb.get(), *Vt = Vtb.get(), *S = Sb.get(),
       *dP = dPb.get(), *dQ = dQb.get();
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < qitems; ++item) {
      const int64_t t = item / Hq, h = item % Hq, hk = h / group, b = qtiles.seq[t];
      const int64_t q0 = a.cu_seqlens_q[b], k0 = a.cu_seqlens_k[b];
      const SeqMask mask(a.cu_seqlens_q[b + 1] - q0, a.cu_seqlens_k[b + 1] - k0, a);
      const int64_t i0 = qtiles.row0[t], ni = std::min<int64_t>(kBQ, mask.lq - i0);
      load_rows<T, M_>(q, q0 + i0, ni, Hq, h, D, Q, Dp, scale);
      load_rows<T, M_>(dout, q0 + i0, ni, Hq, h, D, G, Dp, M_(1));
      std::memset(dQ, 0, sizeof(M_) * ni * Dp);
      const M_* lse_r = lse + h * Tq + q0 + i0;
      const M_* dv_r = Dv.get() + h * Tq + q0 + i0;
      const int64_t kbeg = mask.lo(i0), kend = mask.hi(i0 + ni - 1) + 1;
      for (int64_t j0 = kbeg; j0 < kend; j0 += kBK) {
        const int64_t nk = std::min<int64_t>(kBK, kend - j0), nkp = round_up(nk, kNR);
        const bool full = mask.full(i0, i0 + ni, j0, j0 + nk);
        load_rows_transposed<T, M_>(k, k0 + j0, nk, Hk, hk, D, Kt, kBK, rowb.get());
        load_rows<T, M_>(k, k0 + j0, nk, Hk, hk, D, K, Dp, M_(1));
        load_rows_transposed<T, M_>(v, k0 + j0, nk, Hk, hk, D, Vt, kBK, rowb.get());
        gemm_tile<M_>(ni, nkp, D, Q, Dp, 1, Kt, kBK, S, kBK, false);
        probabilities<M_>(S, kBK, lse_r, ni, nk, i0, j0, mask, full);
        gemm_tile<M_>(ni, nkp, D, G, Dp, 1, Vt, kBK, dP, kBK, false);
        for (int64_t r = 0; r < ni; ++r) {
          M_* d = dP + r * kBK;
          const M_* p = S + r * kBK;
          const M_ dvr = dv_r[r];
#pragma omp simd
          for (int64_t c = 0; c < nk; ++c) d[c] = p[c] * (d[c] - dvr);
        }
        gemm_tile<M_>(ni, Dp, nk, dP, kBK, 1, K, Dp, dQ, Dp, true);  // dQ += dS K
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
