"""SwiGLU elementwise part, silu(gate) * up (8192 tokens x 5632 intermediate), separate and packed.

  swiglu         gate, up [N, F] -> [N, F]
  swiglu_packed  x [N, 2F] = [gate | up] (one gate_up projection) -> [N, F]

Byte model (s = element size; the same for both forms):
  fwd      read gate, up; write out                         3·N·F·s
  fwd+bwd  + read dout, gate, up; write dgate, dup          8·N·F·s
Baselines: the Hugging Face eager code (Qwen2MLP: `act_fn(gate) * up`, F.silu; the packed form
splits with chunk) and torch.compile of it. PyTorch has no fused SwiGLU.

`python -m bench.ops.bench_swiglu --quick` runs this family alone (same flags as run_all).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.harness import Case, Provider, compiled, mmfuse_op

OPS = ("swiglu", "swiglu_packed")


def hf_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def hf_swiglu_packed(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def default_shape(quick: bool) -> tuple[int, int]:
    """(N, F)."""
    return (1024, 1408) if quick else (8192, 5632)


def cases(op: str, quick: bool, dtypes, shape: tuple[int, int] | None = None) -> list[Case]:
    N, Fdim = shape or default_shape(quick)
    out = []
    for dtype in dtypes:
        s = torch.finfo(dtype).bits // 8
        nbytes = {"fwd": 3 * N * Fdim * s, "fwd+bwd": 8 * N * Fdim * s}
        model = {"fwd": "3·N·F·s", "fwd+bwd": "8·N·F·s"}
        if op == "swiglu":
            def make(dtype=dtype):
                return {"gate": torch.randn(N, Fdim, dtype=dtype, requires_grad=True),
                        "up": torch.randn(N, Fdim, dtype=dtype, requires_grad=True)}
            grad_inputs = ("gate", "up")
            hf_c = compiled(hf_swiglu)
            providers = [mmfuse_op("swiglu", lambda f, i: f(i["gate"], i["up"])),
                         Provider("hf_eager", lambda i: hf_swiglu(i["gate"], i["up"])),
                         Provider("torch_compile", lambda i, f=hf_c: f(i["gate"], i["up"]))]
            shape_str = f"{N}x{Fdim}"
        elif op == "swiglu_packed":
            def make(dtype=dtype):
                return {"x": torch.randn(N, 2 * Fdim, dtype=dtype, requires_grad=True)}
            grad_inputs = ("x",)
            hf_c = compiled(hf_swiglu_packed)
            providers = [mmfuse_op("swiglu_packed", lambda f, i: f(i["x"])),
                         Provider("hf_eager", lambda i: hf_swiglu_packed(i["x"])),
                         Provider("torch_compile", lambda i, f=hf_c: f(i["x"]))]
            shape_str = f"{N}x2*{Fdim}"
        else:
            raise ValueError(f"unknown op {op!r}; this module benchmarks {', '.join(OPS)}")
        out.append(Case(op=op, shape=shape_str, dims={"N": N, "F": Fdim}, dtype=dtype, make_inputs=make,
                        grad_inputs=grad_inputs, bytes=nbytes, bytes_model=model, copy_nbytes=N * Fdim * s,
                        providers=providers))
    return out


if __name__ == "__main__":
    import sys

    from bench.run_all import main
    raise SystemExit(main(["--ops", ",".join(OPS), *sys.argv[1:]]))
