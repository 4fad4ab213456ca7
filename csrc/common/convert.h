// Element conversion between storage types and the fp32 (fp64) math type.
// Scalar helpers for element-wise loops and row helpers that convert a whole row into an
// L1-resident fp32 buffer: with F16C / AVX-512 the row helpers use the hardware converters,
// bf16 is a 16-bit shift (load) and round-to-nearest-even (store) that the compiler vectorizes.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/bits.h"

#if defined(__F16C__) || defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#ifndef MMFUSE_ISA_NS
#error "common/convert.h belongs to kernel sources compiled per ISA (MMFUSE_ISA_NS)"
#endif

// Everything here lives in the flavour's namespace: the same inline function compiled with
// different -m flags in two translation units must not be merged by the linker (an AVX-512 copy
// could otherwise end up called from the generic kernels on a CPU without AVX-512).
namespace mmfuse {
namespace MMFUSE_ISA_NS {

struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

inline float bf16_to_f32(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  // Round to nearest even; NaN stays a quiet NaN.
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (f != f) ? static_cast<uint16_t>((u >> 16) | 0x40u) : static_cast<uint16_t>(rounded);
}

// IEEE half <-> float, exact (subnormals, inf, NaN) and round-to-nearest-even.
inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: value = man * 2^-24
      float f = static_cast<float>(man) * 5.9604644775390625e-8f;
      std::memcpy(&u, &f, 4);
      u |= sign;
    }
  } else if (exp == 31) {
    u = sign | 0x7F800000u | (man << 13);
  } else {
    u = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

inline uint16_t f32_to_f16(float f) {
#if defined(__F16C__)
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t absu = u & 0x7FFFFFFFu;
  if (absu >= 0x7F800000u) return static_cast<uint16_t>(sign | 0x7C00u | (absu > 0x7F800000u ? 0x200u : 0u));
  if (absu >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to inf
  if (absu < 0x38800000u) {  // result is subnormal or zero: let the FPU round (x * 2^24)
    float a;
    std::memcpy(&a, &absu, 4);
    float scaled = a * 16777216.0f;           // exact
    uint32_t m = static_cast<uint32_t>(std::nearbyint(scaled));  // ties to even (default mode)
    return static_cast<uint16_t>(sign | m);
  }
  uint32_t rounded = absu + 0xFFFu + ((absu >> 13) & 1u);
  return static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
#endif
}

template <typename T> struct MathType { using type = float; };
template <> struct MathType<double> { using type = double; };
template <typename T> using math_t = typename MathType<T>::type;

template <typename T> inline math_t<T> load(const T& v) { return static_cast<math_t<T>>(v); }
template <> inline float load<bf16_t>(const bf16_t& v) { return bf16_to_f32(v.bits); }
template <> inline float load<f16_t>(const f16_t& v) { return f16_to_f32(v.bits); }

template <typename T> inline T store(math_t<T> v) { return static_cast<T>(v); }
template <> inline bf16_t store<bf16_t>(float v) {
  // Branch-free twin of f32_to_bf16, so that loops calling it vectorise.
  const uint32_t u = float_to_bits(v);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return bf16_t{static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : rounded)};
}
template <> inline f16_t store<f16_t>(float v) { return f16_t{f32_to_f16(v)}; }

// Whether element-wise loops over T written with load/store/round_to vectorise. f16's scalar
// converters do not (they are per-element F16C instructions); such rows go through load_row /
// store_row, which use the vector converters.
template <typename T> inline constexpr bool kElementwiseVectorises = !std::is_same_v<T, f16_t>;

// Round a math value to T's precision and back (identity for float/double).
template <typename T> inline math_t<T> round_to(math_t<T> v) { return load<T>(store<T>(v)); }
template <> inline float round_to<float>(float v) { return v; }
template <> inline double round_to<double>(double v) { return v; }

// ---- row conversion --------------------------------------------------------------------------

template <typename T>
inline void load_row(const T* __restrict src, math_t<T>* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = load<T>(src[i]);
}

template <>
inline void load_row<bf16_t>(const bf16_t* __restrict src, float* __restrict dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}

template <>
inline void load_row<f16_t>(const f16_t* __restrict src, float* __restrict dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))));
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
  for (; i < n; ++i) dst[i] = f16_to_f32(s[i]);
}

// A tile of an input in the math type: fp32 (fp64) rows are read where they are.
template <typename T>
inline const math_t<T>* tile_in(const T* src, math_t<T>* buf, int64_t n) {
  if constexpr (std::is_same_v<T, math_t<T>>) {
    (void)buf; (void)n;
    return src;
  } else {
    load_row<T>(src, buf, n);
    return buf;
  }
}

template <typename T>
inline void store_row(const math_t<T>* __restrict src, T* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = store<T>(src[i]);
}

template <>
inline void store_row<bf16_t>(const float* __restrict src, bf16_t* __restrict dst, int64_t n) {
  const uint32_t* s = reinterpret_cast<const uint32_t*>(src);
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u = s[i];
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    d[i] = static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : rounded);
  }
}

template <>
inline void store_row<f16_t>(const float* __restrict src, f16_t* __restrict dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) d[i] = f32_to_f16(src[i]);
}

// Store a finished output row with non-temporal (streaming) stores where the flavour has them:
// the row is not read again by this kernel, so skipping the read-for-ownership of the
// destination lines saves a third of the traffic of a read-one-write-one kernel.
// Callers issue stream_fence() once after the parallel region.
template <typename T>
inline void stream_row(const math_t<T>* __restrict src, T* __restrict dst, int64_t n) {
#if defined(__AVX512F__) || defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    int64_t i = 0;
    while (i < n && (reinterpret_cast<uintptr_t>(dst + i) & 63u)) { dst[i] = src[i]; ++i; }
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
#else
    for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
#endif
    for (; i < n; ++i) dst[i] = src[i];
    return;
  }
#endif
  store_row<T>(src, dst, n);
}

inline void stream_fence() {
#if defined(__AVX512F__) || defined(__AVX2__)
  _mm_sfence();
#endif
}

// Ask for the next row while this one is computed: rows are often one 4 KiB page (2048 bf16),
// and the hardware prefetchers do not cross page boundaries, so each row would otherwise start cold.
inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}

// Round a row in place to T's precision (identity for float/double).
template <typename T>
inline void round_row(math_t<T>* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    (void)buf; (void)n;
  } else {
    // Convert through a small stack tile so the hardware converters are used.
    T tile[256];
    for (int64_t i = 0; i < n; i += 256) {
      int64_t m = n - i < 256 ? n - i : 256;
      store_row<T>(buf + i, tile, m);
      load_row<T>(tile, buf + i, m);
    }
  }
}

}  // namespace MMFUSE_ISA_NS
}  // namespace mmfuse
