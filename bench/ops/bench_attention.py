"""Attention (dense, one sequence) against PyTorch CPU SDPA (ATen's flash kernel), fwd and fwd+bwd.

FLOPs follow FlashAttention's benchmark convention: fwd = 4·S²·H·D (halved when causal),
bwd = 2.5 x fwd, fwd+bwd = 3.5 x fwd. Attention is compute-bound, so this reports GFLOP/s and the
ratio to SDPA measured in the same run rather than a bandwidth roofline; it is standalone
(`python -m bench.ops.bench_attention [--quick] [--threads N]`) and not part of run_all's byte tables.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.common import time_ms
from mmfuse.ops import attention


def measure(S: int, H: int, D: int, causal: bool, dtype: torch.dtype, reps: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    q_THD, k_THD, v_THD = (torch.randn(S, H, D, generator=g).to(dtype).requires_grad_(True) for _ in range(3))
    q_BHSD, k_BHSD, v_BHSD = (t.detach().transpose(0, 1)[None].contiguous().requires_grad_(True)
                              for t in (q_THD, k_THD, v_THD))
    dout_THD = torch.randn(S, H, D, generator=g).to(dtype)
    dout_BHSD = dout_THD.transpose(0, 1)[None].contiguous()
    fwd_flops = 4 * S * S * H * D / (2 if causal else 1)
    providers = {
        "mmfuse": (lambda: attention(q_THD, k_THD, v_THD, causal=causal), dout_THD, (q_THD, k_THD, v_THD)),
        "sdpa": (lambda: F.scaled_dot_product_attention(q_BHSD, k_BHSD, v_BHSD, is_causal=causal), dout_BHSD,
                 (q_BHSD, k_BHSD, v_BHSD)),
    }
    rows = []
    for mode, flops in (("fwd", fwd_flops), ("fwd+bwd", 3.5 * fwd_flops)):
        ms = {}
        for name, (fwd, dout, leaves) in providers.items():
            if mode == "fwd":
                def fn(fwd=fwd):
                    with torch.no_grad():
                        return fwd()
            else:
                def fn(fwd=fwd, dout=dout):
                    fwd().backward(dout)
            ms[name] = time_ms(fn, warmup=1, reps=reps, grad_to_none=leaves)["p50_ms"]
        for name, t in ms.items():
            rows.append({"S": S, "H": H, "D": D, "causal": causal, "dtype": str(dtype).replace("torch.", ""),
                         "mode": mode, "provider": name, "p50_ms": t, "gflops": flops / t / 1e6,
                         "speedup_vs_sdpa": ms["sdpa"] / t})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="S=512 instead of 2048")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    S = 512 if args.quick else 2048
    print(f"threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'shape':>22} {'mode':>8} {'provider':>8} {'p50 ms':>9} {'GFLOP/s':>8} {'vs sdpa':>7}")
    for causal in (False, True):
        for r in measure(S, 16, 128, causal, torch.float32, args.reps):
            shape = f"S{r['S']} H{r['H']} D{r['D']}{' causal' if r['causal'] else ''}"
            print(f"{shape:>22} {r['mode']:>8} {r['provider']:>8} {r['p50_ms']:9.1f} {r['gflops']:8.1f} "
                  f"{r['speedup_vs_sdpa']:6.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
