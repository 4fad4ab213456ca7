"""GPU time and peak memory of mmfuse's linear_cross_entropy (cuBLAS GEMMs around the Triton CE kernel,
gradients computed in the forward) against F.linear + F.cross_entropy, one fwd+bwd step each, on one
card in one run. Default shape: the LM head of Qwen2.5-VL-3B at 16k tokens, N 16384, H 2048,
V 151936, bf16, 1/8 of the labels ignore_index (prompt tokens).

  time    triton.testing.do_bench median (20th/80th percentiles too) of loss + autograd.grad for
          hidden and weight; TFLOP/s counts the three GEMMs, 6·N·H·V (mmfuse skips the ignored
          rows' share, the eager baseline cannot: the same FLOP count divides both).
  memory  torch.cuda.max_memory_allocated over one step, less what was allocated before it (the
          inputs), so the gradients the step returns are included in both.
  check   max |difference| of loss, dhidden and dweight between the two (bf16 rounding level).

    python bench/gpu_linear_cross_entropy.py [--out-dir DIR] [--N 16384 --H 2048 --V 151936] [--dtype bf16]

Writes DIR/gpu-lce-<card>-<date>.json (DIR: $OUT when set, else bench/results). Without a GPU,
`--device cpu --quick` runs both providers once on small shapes (a smoke test of this script; the
C++ core runs mmfuse there).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    _root = Path(__file__).resolve().parents[1]
    sys.path[0] = str(_root)
    try:
        import mmfuse  # noqa: F401
    except ImportError:
        sys.path.insert(1, str(_root / "python"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import common  # noqa: E402
from bench.gpu_bandwidth import card_slug, environment, time_ms  # noqa: E402
from mmfuse import ops  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
IGNORE = -100


def providers():
    return {
        "mmfuse": lambda h, w, y: ops.linear_cross_entropy(h, w, y, ignore_index=IGNORE),
        "eager": lambda h, w, y: F.cross_entropy(F.linear(h, w), y, ignore_index=IGNORE),
    }


def step(fn, h, w, y):
    loss = fn(h, w, y)
    return (loss, *torch.autograd.grad(loss, (h, w)))


def peak_bytes(fn, h, w, y, device: torch.device) -> int | None:
    """Memory one step allocates at its peak above what exists before it (inputs), outputs included."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = step(fn, h, w, y)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return peak


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path,
                   default=Path(os.environ.get("OUT") or common.REPO_ROOT / "bench" / "results"))
    p.add_argument("--N", type=int, default=16384)
    p.add_argument("--H", type=int, default=2048)
    p.add_argument("--V", type=int, default=151936)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test with --quick")
    p.add_argument("--quick", action="store_true", help="N 256, H 128, V 4096 (smoke test; timings not meaningful)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu --quick for a smoke test", file=sys.stderr)
        return 2
    N, H, V = (256, 128, 4096) if args.quick else (args.N, args.H, args.V)
    dtype = DTYPES[args.dtype]
    start = time.monotonic()
    env = environment(device)
    print(f"device {env.get('gpu', device)}  torch {torch.__version__}  triton {env['triton']}  "
          f"commit {env['mmfuse_commit']}  linear_cross_entropy N {N} H {H} V {V} {args.dtype}")

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    w = (torch.randn(V, H, generator=gen) / H ** 0.5).to(device=device, dtype=dtype).requires_grad_(True)
    y = torch.randint(0, V, (N,), generator=gen)
    y[torch.rand(N, generator=gen) < 0.125] = IGNORE
    y = y.to(device)
    flops = 6 * N * H * V

    records, results = [], {}
    for name, fn in providers().items():
        rec = {"op": "linear_cross_entropy", "shape": f"{N}x{H}x{V}", "dtype": args.dtype, "mode": "fwd+bwd",
               "provider": name}
        try:
            results[name] = tuple(t.detach() for t in step(fn, h, w, y))  # warm-up (compiles the kernels)
            rec["peak_alloc_bytes"] = peak_bytes(fn, h, w, y, device)
            t = time_ms(lambda fn=fn: step(fn, h, w, y), device)
            rec.update(t, status="ok", tflops=flops / (t["p50_ms"] * 1e-3) / 1e12)
        except torch.cuda.OutOfMemoryError as exc:
            rec.update(status="oom", reason=str(exc)[:300])
        except Exception as exc:  # a provider that fails is recorded, not fatal
            rec.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:300])
        records.append(rec)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "mmfuse" in results and "eager" in results:
        diff = {k: (a.float() - b.float()).abs().max().item()
                for k, a, b in zip(("loss", "dhidden", "dweight"), results["mmfuse"], results["eager"])}
        for rec in records:
            rec["max_abs_diff_mmfuse_vs_eager"] = diff
    base = next((r for r in records if r["provider"] == "mmfuse" and r["status"] == "ok"), None)
    print(f"{'provider':<8} {'ms p50':>9} {'TFLOP/s':>8} {'peak GiB':>9} {'mmfuse x':>9}")
    for rec in records:
        if rec["status"] != "ok":
            print(f"{rec['provider']:<8} {rec['status']}: {rec.get('reason')}")
            continue
        if base:
            rec["mmfuse_speedup"] = rec["p50_ms"] / base["p50_ms"]
            if rec.get("peak_alloc_bytes") and base.get("peak_alloc_bytes"):
                rec["mmfuse_memory_saving"] = rec["peak_alloc_bytes"] / base["peak_alloc_bytes"]
        gib = rec["peak_alloc_bytes"] / 2**30 if rec.get("peak_alloc_bytes") is not None else float("nan")
        print(f"{rec['provider']:<8} {rec['p50_ms']:9.2f} {rec['tflops']:8.0f} {gib:9.2f} "
              f"{rec.get('mmfuse_speedup', float('nan')):8.2f}x")
    if "max_abs_diff_mmfuse_vs_eager" in records[0]:
        print("max |mmfuse - eager|:", {k: f"{v:.3g}" for k, v in records[0]["max_abs_diff_mmfuse_vs_eager"].items()})

    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    out = args.out_dir / f"gpu-lce-{card_slug(device)}-{date}.json"
    command = "python bench/gpu_linear_cross_entropy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    common.write_json(out, {"schema": "mmfuse-gpu-lce/1", "status": "complete", "environment": env,
                            "command": command, "records": records,
                            "elapsed_s": round(time.monotonic() - start, 1)})
    print(f"wrote {out}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
