// CPU feature detection and the choice of kernel flavour.
#include <omp.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "mmfuse/cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

namespace mmfuse {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::generic: return "generic";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    case Isa::neon: return "neon";
  }
  return "unknown";
}

std::vector<Isa> compiled_isas() {
  std::vector<Isa> out{Isa::generic};
#ifdef MMFUSE_HAVE_ISA_AVX2
  out.push_back(Isa::avx2);
#endif
#ifdef MMFUSE_HAVE_ISA_AVX512
  out.push_back(Isa::avx512);
#endif
#ifdef MMFUSE_HAVE_ISA_NEON
  out.push_back(Isa::neon);
#endif
  return out;
}

namespace {

#if defined(__x86_64__) || defined(_M_X64)
// XCR0: which register states the OS saves (YMM needs bits 1-2, ZMM also bits 5-7).
uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

bool x86_has_avx2() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29), avx = c & (1u << 28);
  if (!(osxsave && fma && f16c && avx)) return false;
  if ((xgetbv0() & 0x6) != 0x6) return false;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return b & (1u << 5);
}

bool x86_has_avx512() {
  if (!x86_has_avx2()) return false;
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  bool f = b & (1u << 16), dq = b & (1u << 17), bw = b & (1u << 30), vl = b & (1u << 31);
  return f && dq && bw && vl && (xgetbv0() & 0xE6) == 0xE6;
}
#endif

bool is_compiled(Isa isa) {
  for (Isa i : compiled_isas())
    if (i == isa) return true;
  return false;
}

Isa best_supported() {
  Isa best = Isa::generic;
  for (Isa i : compiled_isas())
    if (cpu_supports(i)) best = i;  // compiled_isas is ordered from weakest to strongest
  return best;
}

Isa parse_isa(const char* name) {
  for (Isa i : {Isa::generic, Isa::avx2, Isa::avx512, Isa::neon})
    if (std::strcmp(name, isa_name(i)) == 0) return i;
  throw std::invalid_argument(std::string("MMFUSE_CPU_ISA='") + name +
                              "' is not one of generic, avx2, avx512, neon");
}

Isa initial_isa() {
  const char* env = std::getenv("MMFUSE_CPU_ISA");
  if (env && *env) {
    Isa wanted = parse_isa(env);
    if (is_compiled(wanted) && cpu_supports(wanted)) return wanted;
  }
  return best_supported();
}

std::atomic<int> g_active{-1};

}  // namespace

bool cpu_supports(Isa isa) {
  switch (isa) {
    case Isa::generic: return true;
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::avx2: return x86_has_avx2();
    case Isa::avx512: return x86_has_avx512();
#endif
#if defined(__aarch64__)
    case Isa::neon: return true;
#endif
    default: return false;
  }
}

Isa active_isa() {
  int v = g_active.load(std::memory_order_relaxed);
  if (v < 0) {
    v = static_cast<int>(initial_isa());
    g_active.store(v, std::memory_order_relaxed);
  }
  return static_cast<Isa>(v);
}

void set_active_isa(Isa isa) {
  if (!is_compiled(isa))
    throw std::invalid_argument(std::string("ISA '") + isa_name(isa) + "' is not compiled into this build of mmfuse");
  if (!cpu_supports(isa))
    throw std::invalid_argument(std::string("this CPU cannot run the '") + isa_name(isa) + "' kernels");
  g_active.store(static_cast<int>(isa), std::memory_order_relaxed);
}

int default_num_threads() { return omp_get_max_threads(); }

const char* version() {
#ifdef MMFUSE_VERSION
  return MMFUSE_VERSION;
#else
  return "unknown";
#endif
}

}  // namespace mmfuse
