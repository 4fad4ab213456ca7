"""Cross-entropy over a Qwen2.5 vocabulary (V = 151936), alone and fused with the LM head.

  cross_entropy         logits [N, V], labels [N] -> mean loss
  linear_cross_entropy  hidden [N, H], weight [V, H], labels [N] -> mean loss (never N x V logits)

Byte model (s = element size):
  cross_entropy         fwd: read logits 1·N·V·s; fwd+bwd: + read logits, write dlogits 3·N·V·s
  linear_cross_entropy  GEMM-bound (3 GEMMs of 2·N·H·V flops); the byte model counts only the
                        operands: fwd reads hidden, weight (N·H + V·H)·s; fwd+bwd + writes both grads
Baselines: PyTorch eager (`F.cross_entropy`, `F.linear` + `F.cross_entropy`) and torch.compile of it.

Peak memory (not a harness mode): `python -m bench.ops.bench_cross_entropy --memory` runs one
fwd+bwd of linear_cross_entropy and of F.linear + F.cross_entropy at N=4096, H=2048, V=151936 fp32,
each in a fresh subprocess, and reports the growth of the resident-set high-water mark
(ru_maxrss) over the inputs and one small warm-up: torch's CPU allocations are invisible to
tracemalloc. `python -m bench.ops.bench_cross_entropy --quick` runs the timing cases alone.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch
import torch.nn.functional as F

from bench.harness import Case, Provider, compiled, mmfuse_op

OPS = ("cross_entropy", "linear_cross_entropy")
IGNORE = -100


def eager_ce(logits, labels):
    return F.cross_entropy(logits, labels, ignore_index=IGNORE)


def eager_lce(hidden, weight, labels):
    return F.cross_entropy(F.linear(hidden, weight), labels, ignore_index=IGNORE)


def default_shape(op: str, quick: bool) -> dict[str, int]:
    if op == "cross_entropy":
        return {"N": 512, "V": 32000} if quick else {"N": 4096, "V": 151936}
    return {"N": 256, "H": 256, "V": 32000} if quick else {"N": 4096, "H": 2048, "V": 151936}


def _labels(N: int, V: int) -> torch.Tensor:
    y = torch.randint(0, V, (N,))
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
                return {"hidden": torch.randn(N, H, dtype=dtype, requires_grad=True),
                        "weight": (torch.randn(V, H) / H ** 0.5).to(dtype).requires_grad_(True),
                        "labels": _labels(N, V)}
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
        out.append(Case(op=op, shape=shape_str, dims=dict(dims), dtype=dtype, make_inputs=make,
                        grad_inputs=grad_inputs, bytes=nbytes, bytes_model=model, copy_nbytes=copy,
                        providers=providers, note="GEMM-bound" if op == "linear_cross_entropy" else ""))
    return out


# ---- peak memory -------------------------------------------------------------------------------

def _peak_child(provider: str, N: int, H: int, V: int) -> dict:
    """One fwd+bwd in this (fresh) process; ru_maxrss growth over inputs + a tiny warm-up, in bytes."""
    import resource
    import time

    import mmfuse.ops

    torch.manual_seed(0)
    h = torch.randn(N, H, requires_grad=True)
    w = (torch.randn(V, H) / H ** 0.5).requires_grad_(True)
    y = _labels(N, V)
    fn = (lambda a, b, c: mmfuse.ops.linear_cross_entropy(a, b, c)) if provider == "mmfuse" else eager_lce
    small = fn(h[:2].detach().requires_grad_(True), w[:64].detach().requires_grad_(True), y[:2].clamp(max=63))
    small.backward()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    loss = fn(h, w, y)
    loss.backward()
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grads = (h.grad.numel() + w.grad.numel()) * 4
    return {"provider": provider, "extra_bytes": after - before, "grad_bytes": grads, "seconds": dt,
            "loss": float(loss)}


def peak_memory(N: int = 4096, H: int = 2048, V: int = 151936) -> list[dict]:
    results = []
    for provider in ("mmfuse", "hf_eager"):
        code = (f"import json; from bench.ops.bench_cross_entropy import _peak_child; "
                f"print(json.dumps(_peak_child({provider!r}, {N}, {H}, {V})))")
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


if __name__ == "__main__":
    if "--memory" in sys.argv:
        quick = "--quick" in sys.argv
        res = peak_memory(*((512, 256, 32000) if quick else (4096, 2048, 151936)))
        for r in res:
            print(f"{r['provider']:>9}: peak extra {r['extra_bytes'] / 2**20:9.1f} MiB "
                  f"(gradients alone {r['grad_bytes'] / 2**20:.1f} MiB), fwd+bwd {r['seconds']:.2f} s, loss {r['loss']:.5f}")
        mm, base = res
        print(f"ratio mmfuse / eager: memory {mm['extra_bytes'] / base['extra_bytes']:.3f}, "
              f"time {mm['seconds'] / base['seconds']:.3f}")
        raise SystemExit(0)
    from bench.run_all import main
    raise SystemExit(main(["--ops", ",".join(OPS), *sys.argv[1:]]))
