// The public kernel API forwards to the flavour chosen by active_isa().
#include "common/kernel_list.h"
#include "mmfuse/cpu.h"

namespace mmfuse {

#define MMFUSE_DECLARE(name, Args) void name(const Args& args);
#define MMFUSE_DECLARE_NS(ns) namespace ns { MMFUSE_FOR_EACH_KERNEL(MMFUSE_DECLARE) }

MMFUSE_DECLARE_NS(isa_generic)
#ifdef MMFUSE_HAVE_ISA_AVX2
MMFUSE_DECLARE_NS(isa_avx2)
#endif
#ifdef MMFUSE_HAVE_ISA_AVX512
MMFUSE_DECLARE_NS(isa_avx512)
#endif
#ifdef MMFUSE_HAVE_ISA_NEON
MMFUSE_DECLARE_NS(isa_neon)
#endif

#ifdef MMFUSE_HAVE_ISA_AVX2
#define MMFUSE_CASE_AVX2(name) case Isa::avx2: return isa_avx2::name(args);
#else
#define MMFUSE_CASE_AVX2(name)
#endif
#ifdef MMFUSE_HAVE_ISA_AVX512
#define MMFUSE_CASE_AVX512(name) case Isa::avx512: return isa_avx512::name(args);
#else
#define MMFUSE_CASE_AVX512(name)
#endif
#ifdef MMFUSE_HAVE_ISA_NEON
#define MMFUSE_CASE_NEON(name) case Isa::neon: return isa_neon::name(args);
#else
#define MMFUSE_CASE_NEON(name)
#endif

#define MMFUSE_DEFINE(name, Args)              \
  void name(const Args& args) {                \
    switch (active_isa()) {                    \
      MMFUSE_CASE_AVX2(name)                   \
      MMFUSE_CASE_AVX512(name)                 \
      MMFUSE_CASE_NEON(name)                   \
      default: return isa_generic::name(args); \
    }                                          \
  }

MMFUSE_FOR_EACH_KERNEL(MMFUSE_DEFINE)

}  // namespace mmfuse
