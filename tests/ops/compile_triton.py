"""Compiles one configuration of every Triton kernel of mmfuse for an NVIDIA GPU, without a GPU:
Triton's front end, its MLIR passes, LLVM and ptxas (bundled with the triton wheel). The interpreter
runs kernels as Python and accepts code the compiler rejects (Python ints where the compiler wants
tensors, say), so this is what catches a kernel that would fail to build on a GPU.

    python -m tests.ops.compile_triton [ARCH]       # ARCH: 90 (H100/H200, default), 80 (A100)

Run without TRITON_INTERPRET (kernels must be JIT functions, not interpreted ones). Pointer and size
arguments are declared 16-divisible, as Triton's launcher specializes them for aligned tensors and
sizes that are multiples of 16 (except do_not_specialize arguments). Exits non-zero when a kernel
fails to compile, loads nothing with vector instructions, needs more shared memory than the GPU
has, a bf16 attention kernel has no tensor-core MMA, or the cos/sin use the hardware's approximations.
"""

from __future__ import annotations

import os
import re
import sys


# Shared memory a block may use (bytes): the load of a kernel over it fails on the GPU, which this
# compile-only check would otherwise not see. sm_90: 227 KiB, sm_80: 163 KiB.
_SMEM_LIMIT = {90: 232448, 80: 166912}


def _compile(fn, types: dict, consts: dict, target, num_warps: int = 4, num_stages: int = 3):
    import triton
    from triton.compiler import ASTSource

    sig = {a: ("constexpr" if a in consts else types[a]) for a in fn.arg_names}
    # Arguments in do_not_specialize get no divisibility hint at launch, so none here either.
    plain = set(getattr(fn, "do_not_specialize", ()))
    aligned = [a for a in fn.arg_names
               if a not in consts and a not in plain and (types[a].startswith("*") or types[a] == "i32")]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    return triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=target,
                          options={"num_warps": num_warps, "num_stages": num_stages})


def main(arch: int = 90) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter cannot compile", file=sys.stderr)
        return 2
    from triton.backends.compiler import GPUTarget

    from mmfuse.kernels.triton import attention, cross_entropy, mrope, rms_norm, rotary, swiglu

    target = GPUTarget("cuda", arch, 32)
    i32, bf16, f32 = "i32", "*bf16", "*fp32"
    rn_fwd = dict(X=bf16, R=bf16, W=bf16, Y=bf16, S=bf16, n_rows=i32, D=i32, stride_x=i32, stride_r=i32,
                  stride_y=i32, stride_s=i32, eps="fp32")
    rn_bwd = dict(DY=bf16, X=bf16, W=bf16, DSUM=bf16, DX=bf16, DW_PARTIAL=f32, n_rows=i32, D=i32, stride_dy=i32,
                  stride_x=i32, stride_ds=i32, stride_dx=i32, eps="fp32")
    glu_fwd = dict(G=bf16, U=bf16, O=bf16, n_rows=i32, N=i32, stride_g=i32, stride_u=i32, stride_o=i32)
    glu_bwd = dict(DO=bf16, G=bf16, U=bf16, DG=bf16, DU=bf16, n_rows=i32, N=i32, stride_do=i32, stride_g=i32,
                   stride_u=i32, stride_dg=i32, stride_du=i32)
    rot = dict(X=bf16, Y=bf16, COS=f32, SIN=f32, **{a: i32 for a in (
        "T", "H", "D", "R", "table_rows", "stride_xt", "stride_xh", "stride_yt", "stride_yh", "stride_ct",
        "stride_st")})
    mro = dict(Q=bf16, K=bf16, QO=bf16, KO=bf16, POS="*i64", INV_FREQ=f32, **{a: i32 for a in (
        "T", "HQ", "HK", "R", "SEC_T", "SEC_TH", "stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_qot",
        "stride_qoh", "stride_kot", "stride_koh", "stride_ps", "stride_pt")})
    ce_fwd = dict(X=bf16, Y="*i64", LOSS=f32, LSE=f32, G=bf16, ROW_SCALE=f32, n_rows=i32, V=i32, stride_x=i32,
                  stride_g=i32, ignore_index=i32, scale="fp32")
    ce_bwd = {k: v for k, v in ce_fwd.items() if k != "LOSS"}
    unit = dict(stride_xd=1, stride_cr=1, stride_sr=1)  # Triton specializes strides equal to 1 as constants

    def att(fn, dt, ptrs, ints, floats=("qk_scale",)):
        return dict(**{a: ("*i32" if a.startswith("CU_") else f32 if a in ("LSE", "DELTA", "DLSE") else dt)
                       for a in ptrs}, **{a: i32 for a in ints}, **{a: "fp32" for a in floats})
    at_ints = ("n_seqs", "D", "GROUP", "left", "right")
    at_strides = ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh")
    at_fwd = {dt: att(attention._attention_fwd_kernel, dt, ("Q", "K", "V", "O", "LSE", "CU_Q", "CU_K"),
                      at_ints + at_strides + ("stride_ot", "stride_oh", "stride_lh")) for dt in (bf16, f32)}
    at_pre = att(attention._attention_bwd_preprocess_kernel, bf16, ("O", "DO", "DLSE", "DELTA"),
                 ("T", "D", "stride_ot", "stride_oh", "stride_dot", "stride_doh", "stride_lh"), ())
    at_dkdv = att(attention._attention_bwd_dkdv_kernel, bf16,
                  ("Q", "K", "V", "DO", "LSE", "DELTA", "DK", "DV", "CU_Q", "CU_K"),
                  at_ints + at_strides + ("stride_dot", "stride_doh", "stride_dkt", "stride_dkh", "stride_dvt",
                                          "stride_dvh", "stride_lh"), ("qk_scale", "scale"))
    at_dq = {dt: att(attention._attention_bwd_dq_kernel, dt,
                     ("Q", "K", "V", "DO", "LSE", "DELTA", "DQ", "CU_Q", "CU_K"),
                     at_ints + at_strides + ("stride_dot", "stride_doh", "stride_dqt", "stride_dqh", "stride_lh"),
                     ("qk_scale", "scale")) for dt in (bf16, f32)}
    # Launch configurations of `attention._blocks` on CUDA (bf16 at D = 128; fp32 at D = 128 and 256).
    causal = dict(HAS_LEFT=False, HAS_RIGHT=True)
    cases = [
        ("rms_norm fwd (add, whole rows)", rms_norm._rms_norm_fwd_kernel, rn_fwd,
         dict(HAS_RESIDUAL=True, ROWS=1, BLOCK_D=2048, SINGLE_CHUNK=True), 8),
        ("rms_norm fwd (chunked rows)", rms_norm._rms_norm_fwd_kernel, rn_fwd,
         dict(HAS_RESIDUAL=False, ROWS=1, BLOCK_D=8192, SINGLE_CHUNK=False), 16),
        ("rms_norm bwd (whole rows)", rms_norm._rms_norm_bwd_kernel, rn_bwd,
         dict(HAS_DSUM=True, ROWS=16, BLOCK_D=128, SINGLE_CHUNK=True), 8),
        ("rms_norm bwd (chunked rows)", rms_norm._rms_norm_bwd_kernel, rn_bwd,
         dict(HAS_DSUM=False, ROWS=1, BLOCK_D=8192, SINGLE_CHUNK=False), 16),
        ("swiglu fwd", swiglu._swiglu_fwd_kernel, glu_fwd, dict(ROWS=1, BLOCK_N=2048), 8),
        ("swiglu bwd", swiglu._swiglu_bwd_kernel, glu_bwd, dict(ROWS=1, BLOCK_N=2048), 8),
        ("rotary (rotate-half)", rotary._rotary_fwd_kernel, rot,
         dict(INTERLEAVED=False, INVERSE=False, BLOCK_H=16, BLOCK_R=64, BLOCK_TAIL=64, **unit), 4),
        ("rotary (interleaved, inverse)", rotary._rotary_fwd_kernel, rot,
         dict(INTERLEAVED=True, INVERSE=True, BLOCK_H=16, BLOCK_R=32, BLOCK_TAIL=64, **unit), 4),
        ("apply_mrope", mrope._mrope_fwd_kernel, mro,
         dict(INVERSE=False, BLOCK_HQ=16, BLOCK_HK=2, BLOCK_R=64, stride_qd=1, stride_kd=1), 4),
        ("attention fwd (bf16, causal)", attention._attention_fwd_kernel, at_fwd[bf16],
         dict(**causal, PRECISION="tf32", BLOCK_M=128, BLOCK_N=64, BLOCK_D=128), (8, 3)),
        ("attention fwd (fp32, window, D 256)", attention._attention_fwd_kernel, at_fwd[f32],
         dict(HAS_LEFT=True, HAS_RIGHT=True, PRECISION="ieee", BLOCK_M=32, BLOCK_N=32, BLOCK_D=256), (8, 2)),
        ("attention bwd preprocess", attention._attention_bwd_preprocess_kernel, at_pre,
         dict(HAS_DLSE=True, BLOCK_T=64, BLOCK_D=128), 4),
        ("attention bwd dK/dV (bf16, causal)", attention._attention_bwd_dkdv_kernel, at_dkdv,
         dict(**causal, PRECISION="tf32", SPLIT_DS=True, BLOCK_M=32, BLOCK_N=128, BLOCK_D=128), (8, 2)),
        ("attention bwd dQ (bf16, causal)", attention._attention_bwd_dq_kernel, at_dq[bf16],
         dict(**causal, PRECISION="tf32", SPLIT_DS=True, BLOCK_M=128, BLOCK_N=32, BLOCK_D=128), (8, 2)),
        ("attention bwd dQ (fp32)", attention._attention_bwd_dq_kernel, at_dq[f32],
         dict(HAS_LEFT=False, HAS_RIGHT=False, PRECISION="ieee", SPLIT_DS=False, BLOCK_M=64, BLOCK_N=64,
              BLOCK_D=128), (8, 2)),
        ("cross_entropy fwd (loss, lse)", cross_entropy._cross_entropy_fwd_kernel, ce_fwd,
         dict(WRITE_GRAD=False, HAS_ROW_SCALE=False, BLOCK_V=4096), 8),
        ("cross_entropy fwd (+ grad in place)", cross_entropy._cross_entropy_fwd_kernel, ce_fwd,
         dict(WRITE_GRAD=True, HAS_ROW_SCALE=True, BLOCK_V=4096), 8),
        ("cross_entropy bwd", cross_entropy._cross_entropy_bwd_kernel, ce_bwd,
         dict(HAS_ROW_SCALE=False, BLOCK_V=4096), 8),
    ]
    failed = 0
    for name, fn, types, consts, launch in cases:
        warps, stages = launch if isinstance(launch, tuple) else (launch, 3)
        kernel = _compile(fn, types, consts, target, warps, stages)
        ptx = kernel.asm["ptx"]
        smem = kernel.metadata.shared
        failed += smem > _SMEM_LIMIT.get(arch, 0)
        vector = len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]", ptx))
        failed += vector == 0
        extra = ""
        if "bf16" in name:  # the attention matmuls must run on tensor cores (wgmma on sm_90, mma.sync before)
            mma = len(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)", ptx))
            failed += mma == 0
            extra = f"  tensor-core MMAs: {mma}{' (NONE)' if mma == 0 else ''}"
        if smem > 1024:
            over = " (OVER THE LIMIT)" if smem > _SMEM_LIMIT.get(arch, 0) else ""
            extra += f"  shared memory: {smem // 1024} KiB{over}"
        print(f"{name:<36} ok  vector loads: {vector}{'  (NONE: scalar loads only)' if vector == 0 else ''}{extra}")
    ptx = _compile(mrope._sincos_kernel, dict(X=f32, COS=f32, SIN=f32, n=i32), dict(BLOCK=1024), target).asm["ptx"]
    approx = len(re.findall(r"(?:sin|cos)\.approx", ptx))
    failed += approx > 0
    print(f"{'cos/sin':<36} ok  hardware sin/cos.approx: {approx}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
