"""Cross-entropy over a Qwen2.5 vocabulary (V = 151936), alone and fused with the LM head.

  cross_entropy         logits [N, V], labels [N] -> mean loss
  linear_cross_entropy  hidden [N, H], weight [V, H], labels [N] -> mean loss (never N x V logits)

Models (s = element size):
  cross_entropy         memory-bound. fwd: read logits 1·N·V·s; fwd+bwd: + read logits, write
                        dlogits 3·N·V·s. 1/8 of the labels are ignore_index (prompt tokens).
  linear_cross_entropy  compute-bound: 2·N·H·V FLOPs per GEMM, one in the forward (the logits) and
                        two in the backward (dhidden, dweight), so fwd 2·N·H·V, fwd+bwd 6·N·H·V,
                        held to the fp32 GEMM rate. Every label is valid, so both sides run the same
                        three GEMMs (mmfuse drops ignore_index rows before its GEMMs, the baseline
                        cannot). mmfuse computes the gradients inside its forward, so its `fwd` row
                        costs about a whole step: fwd+bwd is the comparison that means something.
Baselines: PyTorch eager (`F.cross_entropy`, `F.linear` + `F.cross_entropy`) and torch.compile of it.

Peak memory of linear_cross_entropy (run by run_all along with the timings, not a harness mode):
one fwd+bwd per provider, each in a fresh subprocess, reporting how far the resident set rose
above the inputs (`harness.peak_rss_growth`; the gradients the step returns are included and shown
apart). `python -m bench.ops.bench_cross_entropy --memory [--quick]` runs only that;
`python -m bench.ops.bench_cross_entropy --quick` runs the timing cases alone.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from bench.harness import Case, Provider, compiled, mmfuse_op

OPS = ("cross_entropy", "linear_cross_entropy")
# op -> providers whose fwd+bwd peak memory run_all measures (each in its own process).
MEMORY = {"linear_cross_entropy": ("mmfuse", "hf_eager")}
IGNORE = -100


def eager_ce(logits, labels):
    return F.cross_entropy(logits, labels, ignore_index=IGNORE)


def eager_lce(hidden, weight, labels):
    return F.cross_entropy(F.linear(hidden, weight), labels, ignore_index=IGNORE)


def default_shape(op: str, quick: bool) -> dict[str, int]:
    if op == "cross_entropy":
        return {"N": 512, "V": 32000} if quick else {"N": 4096, "V": 151936}
    return {"N": 256, "H": 256, "V": 32000} if quick else {"N": 4096, "H": 2048, "V": 151936}


def _labels(N: int, V: int, ignored: bool = True) -> torch.Tensor:
    y = torch.randint(0, V, (N,))
    if ignored:
        y[: N // 8] = IGNORE  # a few masked (prompt) tokens, as in SFT batches
    return y


def cases(op: str, quick: bool, dtypes, shape: dict[str, int] | None = None) -> list[Case]:
    dims = shape or default_shape(op, quick)
    out = []
    for dtype in dtypes:
        s = torch.finfo(dtype).bits // 8
        if op == "cross_entropy":
            N, V = dims["N"], dims["V"]

            def make(dtype=dtype, N=N, V=V):
                return {"logits": torch.randn(N, V, dtype=dtype, requires_grad=True), "labels": _labels(N, V)}
            grad_inputs = ("logits",)
            ce_c = compiled(eager_ce)
            providers = [mmfuse_op("cross_entropy", lambda f, i: f(i["logits"], i["labels"])),
                         Provider("hf_eager", lambda i: eager_ce(i["logits"], i["labels"])),
                         Provider("torch_compile", lambda i, f=ce_c: f(i["logits"], i["labels"]))]
            nbytes = {"fwd": N * V * s, "fwd+bwd": 3 * N * V * s}
            model = {"fwd": "N·V·s", "fwd+bwd": "3·N·V·s"}
            shape_str, copy = f"{N}x{V}", N * V * s
        elif op == "linear_cross_entropy":
            N, H, V = dims["N"], dims["H"], dims["V"]

            def make(dtype=dtype, N=N, H=H, V=V):
                weight = torch.randn(V, H)
                weight.mul_(H ** -0.5)  # in place: no second V x H temporary (1.2 GB at full size)
                return {"hidden": torch.randn(N, H, dtype=dtype, requires_grad=True),
                        "weight": weight.to(dtype).requires_grad_(True), "labels": _labels(N, V, ignored=False)}
            grad_inputs = ("hidden", "weight")
            lce_c = compiled(eager_lce)
            providers = [mmfuse_op("linear_cross_entropy", lambda f, i: f(i["hidden"], i["weight"], i["labels"])),
                         Provider("hf_eager", lambda i: eager_lce(i["hidden"], i["weight"], i["labels"])),
                         Provider("torch_compile", lambda i, f=lce_c: f(i["hidden"], i["weight"], i["labels"]))]
            nbytes = {"fwd": (N * H + V * H) * s, "fwd+bwd": 2 * (N * H + V * H) * s}
            model = {"fwd": "(N·H + V·H)·s", "fwd+bwd": "2·(N·H + V·H)·s"}
            shape_str, copy = f"{N}x{H}x{V}", V * H * s
        else:
            raise ValueError(f"unknown op {op!r}; this module benchmarks {', '.join(OPS)}")
        lce = op == "linear_cross_entropy"
        out.append(Case(op=op, shape=shape_str, dims=dict(dims), dtype=dtype, make_inputs=make,
                        grad_inputs=grad_inputs, bytes=nbytes, bytes_model=model, copy_nbytes=copy,
                        providers=providers,
                        note=("GEMM-bound; all labels valid; mmfuse's forward computes the gradients too, so "
                              "compare fwd+bwd; one warmup call per measurement" if lce else
                              "1/8 of the labels are ignore_index"),
                        flops={"fwd": 2 * N * H * V, "fwd+bwd": 6 * N * H * V} if lce else None,
                        flops_model={"fwd": "2·N·H·V", "fwd+bwd": "6·N·H·V"} if lce else None,
                        # A full-size step takes tens of seconds: one warmup call reaches the steady state.
                        warmup=1 if lce else None))
    return out


if __name__ == "__main__":
    if "--memory" in sys.argv:
        from bench.harness import peak_memory_records, stderr_progress
        from bench.tables import memory_text

        records = peak_memory_records("bench.ops.bench_cross_entropy", "linear_cross_entropy", [torch.float32],
                                      MEMORY["linear_cross_entropy"], quick="--quick" in sys.argv,
                                      progress=stderr_progress(2))
        print(memory_text(records))
        raise SystemExit(0)
    from bench.run_all import main
    raise SystemExit(main(["--ops", ",".join(OPS), *sys.argv[1:]]))
