"""RMSNorm and fused add+RMSNorm (Qwen2.5-VL hidden 2048, 8192 tokens).

Byte model (s = element size, N rows, D hidden; weight terms included):
  rms_norm      fwd      read x, w; write y                                  2·N·D·s + D·s
                fwd+bwd  + read x, dy, w; write dx, dw                       5·N·D·s + 3·D·s
  add_rms_norm  fwd      read x, r, w; write y, sum                          4·N·D·s + D·s
                fwd+bwd  + read sum, dy, dsum, w; write dx (= dr), dw        8·N·D·s + 3·D·s
Baselines: HF Qwen2RMSNorm (fp32 upcast, round, then weight), F.rms_norm (PyTorch's fused kernel;
it does not round before the weight multiply, which does not matter for timing), torch.compile
of the HF code.

`python -m bench.ops.bench_rms_norm --quick` runs this family alone (same flags as run_all).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.harness import Case, Provider, compiled, mmfuse_op

OPS = ("rms_norm", "add_rms_norm")
EPS = 1e-6


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """transformers' Qwen2RMSNorm.forward."""
    input_dtype = x.dtype
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(input_dtype)


def hf_add_rms_norm(x, residual, weight, eps: float = EPS):
    summed = x + residual
    return hf_rms_norm(summed, weight, eps), summed


def torch_rms_norm(x, weight, eps: float = EPS):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def torch_add_rms_norm(x, residual, weight, eps: float = EPS):
    summed = x + residual
    return F.rms_norm(summed, (x.shape[-1],), weight, eps), summed


def default_shape(quick: bool) -> tuple[int, int]:
    """(N, D)."""
    return (2048, 1024) if quick else (8192, 2048)


def cases(op: str, quick: bool, dtypes, shape: tuple[int, int] | None = None) -> list[Case]:
    N, D = shape or default_shape(quick)
    out = []
    for dtype in dtypes:
        s = torch.finfo(dtype).bits // 8
        if op == "rms_norm":
            def make(dtype=dtype):
                return {"x": torch.randn(N, D, dtype=dtype, requires_grad=True),
                        "w": (1 + 0.1 * torch.randn(D)).to(dtype).requires_grad_()}
            grad_inputs = ("x", "w")
            nbytes = {"fwd": 2 * N * D * s + D * s, "fwd+bwd": 5 * N * D * s + 3 * D * s}
            model = {"fwd": "2·N·D·s + D·s", "fwd+bwd": "5·N·D·s + 3·D·s"}
            hf_c = compiled(hf_rms_norm)
            providers = [mmfuse_op("rms_norm", lambda f, i: f(i["x"], i["w"], EPS)),
                         Provider("hf_eager", lambda i: hf_rms_norm(i["x"], i["w"])),
                         Provider("torch_fused", lambda i: torch_rms_norm(i["x"], i["w"])),
                         Provider("torch_compile", lambda i, f=hf_c: f(i["x"], i["w"]))]
        elif op == "add_rms_norm":
            def make(dtype=dtype):
                return {"x": torch.randn(N, D, dtype=dtype, requires_grad=True),
                        "r": torch.randn(N, D, dtype=dtype, requires_grad=True),
                        "w": (1 + 0.1 * torch.randn(D)).to(dtype).requires_grad_()}
            grad_inputs = ("x", "r", "w")
            nbytes = {"fwd": 4 * N * D * s + D * s, "fwd+bwd": 8 * N * D * s + 3 * D * s}
            model = {"fwd": "4·N·D·s + D·s", "fwd+bwd": "8·N·D·s + 3·D·s"}
            hf_c = compiled(hf_add_rms_norm)
            providers = [mmfuse_op("add_rms_norm", lambda f, i: f(i["x"], i["r"], i["w"], EPS)),
                         Provider("hf_eager", lambda i: hf_add_rms_norm(i["x"], i["r"], i["w"])),
                         Provider("torch_fused", lambda i: torch_add_rms_norm(i["x"], i["r"], i["w"])),
                         Provider("torch_compile", lambda i, f=hf_c: f(i["x"], i["r"], i["w"]))]
        else:
            raise ValueError(f"unknown op {op!r}; this module benchmarks {', '.join(OPS)}")
        out.append(Case(op=op, shape=f"{N}x{D}", dims={"N": N, "D": D}, dtype=dtype, make_inputs=make,
                        grad_inputs=grad_inputs, bytes=nbytes, bytes_model=model,
                        copy_nbytes=N * D * s, providers=providers))
    return out


if __name__ == "__main__":
    from bench.run_all import main
    import sys

    raise SystemExit(main(["--ops", ",".join(OPS), *sys.argv[1:]]))
