// Every kernel entry point that is compiled once per ISA flavour. runtime/dispatch.cpp declares
// them in each flavour's namespace and forwards the public API to the active flavour.
// To add a kernel: add one line here and define it in the op's .cpp inside MMFUSE_ISA_NS.
#pragma once
#include "mmfuse/activation.h"
#include "mmfuse/attention.h"
#include "mmfuse/loss.h"
#include "mmfuse/norm.h"
#include "mmfuse/rope.h"

#define MMFUSE_FOR_EACH_KERNEL(X)       \
  X(rms_norm_fwd, RmsNormFwdArgs)       \
  X(rms_norm_bwd, RmsNormBwdArgs)       \
  X(rotary, RotaryArgs)                 \
  X(mrope, MRopeArgs)                   \
  X(mrope_cos_sin, MRopeCosSinArgs)     \
  X(swiglu_fwd, SwigluFwdArgs)          \
  X(swiglu_bwd, SwigluBwdArgs)          \
  X(attention_fwd, AttentionFwdArgs)    \
  X(attention_bwd, AttentionBwdArgs)    \
  X(cross_entropy, CrossEntropyArgs)
