"""Op showcase used by `mmfuse demo`: each fused op against the float64 reference (max relative
error) and against the PyTorch eager formulation it replaces (forward + backward time).

Not a benchmark: shapes are modest so it finishes in seconds; see bench/ for the real numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from mmfuse import ops
from mmfuse.ops import reference


@dataclass
class Case:
    name: str
    shape: str
    make_inputs: Callable[[torch.dtype], list[torch.Tensor]]  # differentiable inputs
    fused: Callable[..., torch.Tensor | Sequence[torch.Tensor]]
    eager: Callable[..., torch.Tensor | Sequence[torch.Tensor]]
    extra: tuple = ()  # non-differentiable trailing arguments (tables, position ids)


def _outputs(o) -> list[torch.Tensor]:
    return list(o) if isinstance(o, (tuple, list)) else [o]


def _fwd_bwd(fn, inputs, grads_out=None, extra=()):
    outs = _outputs(fn(*inputs, *extra))
    if grads_out is None:
        grads_out = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, inputs, grads_out)
    return outs, grads, grads_out


def _max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.double().abs().max().item() or 1.0
    return (got.double() - ref.double()).abs().max().item() / scale


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def cases(quick: bool) -> list[Case]:
    rows, dim = (512, 1024) if quick else (2048, 2048)
    T, H, D = (256, 8, 128) if quick else (1024, 16, 128)
    mlp = 1408 if quick else 5632
    section = [16, 24, 24]
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    # A text-image-text layout: 64 text tokens, then an 8x(T-64)/8 grid of image tokens.
    t = torch.arange(T)
    img = t >= 64
    position_ids = torch.stack((torch.where(img, 64, t), torch.where(img, 64 + (t - 64) // 8, t),
                                torch.where(img, 64 + (t - 64) % 8, t)))
    cos, sin = ops.mrope_cos_sin(position_ids, inv_freq, section)

    def qk_inputs(dtype):
        return [torch.randn(T, H, D, dtype=dtype), torch.randn(T, max(H // 8, 1), D, dtype=dtype)]

    def rotary_fused(q, k, cos, sin):
        return ops.rotary(q, cos, sin), ops.rotary(k, cos, sin)

    def rotary_eager(q, k, cos, sin):
        return reference.rotary(q, cos, sin), reference.rotary(k, cos, sin)

    def norm_inputs(dtype):
        return [torch.randn(rows, dim, dtype=dtype), torch.rand(dim, dtype=dtype) + 0.5]

    def add_norm_inputs(dtype):
        return [torch.randn(rows, dim, dtype=dtype), torch.randn(rows, dim, dtype=dtype),
                torch.rand(dim, dtype=dtype) + 0.5]

    return [
        Case("rms_norm", f"{rows}x{dim}", norm_inputs, ops.rms_norm, reference.rms_norm),
        Case("add_rms_norm", f"{rows}x{dim}", add_norm_inputs, ops.add_rms_norm, reference.add_rms_norm),
        Case("rotary", f"q+k {T}x{H}x{D}", qk_inputs, rotary_fused, rotary_eager, (cos, sin)),
        Case("apply_mrope", f"q+k {T}x{H}x{D}", qk_inputs, ops.apply_mrope, reference.apply_mrope,
             (position_ids, inv_freq, section)),
        Case("swiglu", f"{rows}x{mlp}", lambda dt: [torch.randn(rows, mlp, dtype=dt), torch.randn(rows, mlp, dtype=dt)],
             ops.swiglu, reference.swiglu),
        Case("swiglu_packed", f"{rows}x2*{mlp}", lambda dt: [torch.randn(rows, 2 * mlp, dtype=dt)],
             ops.swiglu_packed, reference.swiglu_packed),
    ]


def run_showcase(quick: bool = False) -> int:
    torch.manual_seed(0)
    reps = 3 if quick else 7
    print(f"mmfuse op showcase ({torch.get_num_threads()} threads); error = max |out - fp64 ref| / max |ref|\n")
    header = f"{'op':<14} {'shape':<20} {'dtype':<9} {'fwd err':>9} {'grad err':>9} {'eager ms':>9} {'mmfuse ms':>10} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    failures = 0
    for case in cases(quick):
        for dtype in (torch.float32, torch.bfloat16):
            base = case.make_inputs(dtype)
            inputs = [t.clone().requires_grad_(True) for t in base]
            outs, grads, gouts = _fwd_bwd(case.fused, inputs, extra=case.extra)
            ref_inputs = [t.double().requires_grad_(True) for t in base]
            ref_outs, ref_grads, _ = _fwd_bwd(case.eager, ref_inputs, [g.double() for g in gouts], case.extra)
            fwd_err = max(_max_rel_err(o, r) for o, r in zip(outs, ref_outs))
            grad_err = max(_max_rel_err(g, r) for g, r in zip(grads, ref_grads))
            limit = 1e-4 if dtype == torch.float32 else 3e-2
            ok = fwd_err < limit and grad_err < limit
            failures += not ok

            eager_inputs = [t.clone().requires_grad_(True) for t in base]
            t_eager = _median_ms(lambda: _fwd_bwd(case.eager, eager_inputs, gouts, case.extra), reps)
            t_fused = _median_ms(lambda: _fwd_bwd(case.fused, inputs, gouts, case.extra), reps)
            flag = "" if ok else "  <-- error above limit"
            print(f"{case.name:<14} {case.shape:<20} {str(dtype).replace('torch.', ''):<9} {fwd_err:9.1e} "
                  f"{grad_err:9.1e} {t_eager:9.2f} {t_fused:10.2f} {t_eager / t_fused:7.2f}x{flag}")
    print("\ntimes: forward + backward, median of", reps, "runs; eager = the Hugging Face formulation in PyTorch")
    if failures:
        print(f"{failures} case(s) exceeded the error limit")
        return 1
    print("all ops match the float64 reference")
    return 0
