"""Compiles one configuration of every Triton kernel of mmfuse for an NVIDIA GPU, without a GPU:
Triton's front end, its MLIR passes, LLVM and ptxas (bundled with the triton wheel). The interpreter
runs kernels as Python and accepts code the compiler rejects (Python ints where the compiler wants
tensors, say), so this is what catches a kernel that would fail to build on a GPU.

    python -m tests.ops.compile_triton [ARCH]       # ARCH: 90 (H100/H200, default), 80 (A100)

Run without TRITON_INTERPRET (kernels must be JIT functions, not interpreted ones). Pointer and size
arguments are declared 16-divisible, as Triton's launcher specializes them for aligned tensors and
sizes that are multiples of 16. Exits non-zero when a kernel fails to compile, loads nothing with
vector instructions, or the cos/sin use the hardware's approximations.
"""

from __future__ import annotations

import os
import re
import sys


def _compile(fn, types: dict, consts: dict, target, num_warps: int = 4):
    import triton
    from triton.compiler import ASTSource

    sig = {a: ("constexpr" if a in consts else types[a]) for a in fn.arg_names}
    aligned = [a for a in fn.arg_names if a not in consts and (types[a].startswith("*") or types[a] == "i32")]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    return triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=target,
                          options={"num_warps": num_warps})


def main(arch: int = 90) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter cannot compile", file=sys.stderr)
        return 2
    from triton.backends.compiler import GPUTarget

    from mmfuse.kernels.triton import cross_entropy, mrope, rms_norm, rotary, swiglu

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
        ("cross_entropy fwd (loss, lse)", cross_entropy._cross_entropy_fwd_kernel, ce_fwd,
         dict(WRITE_GRAD=False, HAS_ROW_SCALE=False, BLOCK_V=4096), 8),
        ("cross_entropy fwd (+ grad in place)", cross_entropy._cross_entropy_fwd_kernel, ce_fwd,
         dict(WRITE_GRAD=True, HAS_ROW_SCALE=True, BLOCK_V=4096), 8),
        ("cross_entropy bwd", cross_entropy._cross_entropy_bwd_kernel, ce_bwd,
         dict(HAS_ROW_SCALE=False, BLOCK_V=4096), 8),
    ]
    failed = 0
    for name, fn, types, consts, warps in cases:
        ptx = _compile(fn, types, consts, target, warps).asm["ptx"]
        vector = len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]", ptx))
        failed += vector == 0
        print(f"{name:<36} ok  vector loads: {vector}{'  (NONE: scalar loads only)' if vector == 0 else ''}")
    ptx = _compile(mrope._sincos_kernel, dict(X=f32, COS=f32, SIN=f32, n=i32), dict(BLOCK=1024), target).asm["ptx"]
    approx = len(re.findall(r"(?:sin|cos)\.approx", ptx))
    failed += approx > 0
    print(f"{'cos/sin':<36} ok  hardware sin/cos.approx: {approx}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
