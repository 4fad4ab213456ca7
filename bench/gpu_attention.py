"""GPU attention throughput: mmfuse's Triton varlen kernels against PyTorch SDPA, in one run on one card.

Shape: B=2 sequences of S=8192 tokens, H=16 heads (q and kv), D=128, bf16, causal and not. mmfuse
gets them packed ([B*S, H, D] with cu_seqlens [0, S, 2S]); SDPA gets [B, H, S, D] views of the same
packed tensors (the [B, S, H, D] layout its flash kernel reads without a copy). Providers:
  mmfuse        mmfuse.ops.attention (the Triton kernels of mmfuse/kernels/triton/attention.py)
  sdpa_default  F.scaled_dot_product_attention, backend chosen by PyTorch (flash or cuDNN on H100,
                depending on the torch version: see docs/performance.md's SDPA notes)
  sdpa_flash    the same under torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION)
  sdpa_cudnn    the same under SDPBackend.CUDNN_ATTENTION (recorded as failed where unavailable)

FLOPs follow FlashAttention's benchmark convention: fwd = 4 · S² · H · D per sequence, halved when
causal; bwd = 2.5 x fwd, so fwd+bwd = 3.5 x fwd. Times are triton.testing.do_bench medians (20th/80th
percentiles too). Each case also records the largest difference between mmfuse's and SDPA-flash's
out and dq on the same inputs (a check that the kernels ran correctly on this card).

    python bench/gpu_attention.py [--out-dir DIR] [--budget-s 60]

Writes DIR/gpu-attention-<card>-<date>.json (DIR: $OUT when set, else bench/results). Without a
GPU, `--device cpu --quick` runs every provider once on small shapes (a smoke test of this script;
mmfuse then runs its C++ kernels).
"""

from __future__ import annotations

import argparse
import contextlib
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
from mmfuse.ops import _backend, attention  # noqa: E402

MODES = {"fwd": 1.0, "fwd+bwd": 3.5}  # FLOPs relative to the forward


def flops_fwd(B: int, S: int, H: int, D: int, causal: bool) -> float:
    return 4.0 * B * S * S * H * D / (2 if causal else 1)


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, name))


def providers(B: int, S: int, causal: bool) -> dict:
    """name -> fn(q, k, v) on packed [B*S, H, D] tensors, returning out in the packed layout."""

    def sdpa(ctx_name: str | None):
        def run(q, k, v):
            bhsd = [t.view(B, S, *t.shape[1:]).transpose(1, 2) for t in (q, k, v)]
            with _sdpa_backend(ctx_name) if ctx_name else contextlib.nullcontext():
                out = F.scaled_dot_product_attention(*bhsd, is_causal=causal)
            return out.transpose(1, 2).reshape(B * S, *q.shape[1:])
        return run

    def mmfuse_attention(q, k, v):
        cu = torch.arange(0, (B + 1) * S, S, dtype=torch.int32, device=q.device)
        return attention(q, k, v, cu, cu, S, S, causal=causal)

    return {"mmfuse": mmfuse_attention, "sdpa_default": sdpa(None), "sdpa_flash": sdpa("FLASH_ATTENTION"),
            "sdpa_cudnn": sdpa("CUDNN_ATTENTION")}


def runner(fn, leaves, dout, mode: str):
    if mode == "fwd":
        return lambda: fn(*leaves)
    return lambda: torch.autograd.grad(fn(*leaves), leaves, dout)


def agreement(provs: dict, leaves, dout) -> dict:
    """Max |mmfuse - sdpa_flash| of out and dq on these inputs (None when flash is unavailable)."""
    try:
        got = provs["mmfuse"](*leaves)
        want = provs["sdpa_flash"](*leaves)
        dq_got = torch.autograd.grad(got, leaves[0], dout)[0]
        dq_want = torch.autograd.grad(want, leaves[0], dout)[0]
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal
        return {"agreement_error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"max_abs_diff_out_vs_flash": (got.float() - want.float()).abs().max().item(),
            "max_abs_diff_dq_vs_flash": (dq_got.float() - dq_want.float()).abs().max().item(),
            "max_abs_out": want.float().abs().max().item(), "max_abs_dq": dq_want.float().abs().max().item()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path,
                   default=Path(os.environ.get("OUT") or common.REPO_ROOT / "bench" / "results"))
    p.add_argument("--budget-s", type=float, default=60.0,
                   help="no new case starts after this many seconds (the rest is recorded as skipped)")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test with --quick")
    p.add_argument("--quick", action="store_true", help="small shapes (smoke test; timings not meaningful)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu --quick for a smoke test", file=sys.stderr)
        return 2
    B, S, H, D = (2, 256, 4, 64) if args.quick else (2, 8192, 16, 128)
    dtype = torch.bfloat16
    start = time.monotonic()
    env = environment(device)
    print(f"device {env.get('gpu', device)}  torch {torch.__version__}  triton {env['triton']}  "
          f"cudnn {env.get('cudnn')}  commit {env['mmfuse_commit']}")
    g = torch.Generator(device="cpu").manual_seed(0)
    leaves = [torch.randn(B * S, H, D, generator=g).to(device, dtype).requires_grad_(True) for _ in range(3)]
    dout = torch.randn(B * S, H, D, generator=g).to(device, dtype)
    env["mmfuse_backend"] = _backend.select("attention", leaves[0])  # "triton" expected on a GPU
    print(f"attention B={B} S={S} H={H} D={D} bf16 (packed varlen for mmfuse, backend {env['mmfuse_backend']})")
    print(f"{'causal':<7} {'mode':<8} {'provider':<13} {'ms p50':>9} {'TFLOP/s':>8} {'mmfuse x':>9}")
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    out = args.out_dir / f"gpu-attention-{card_slug(device)}-{date}.json"
    records: list[dict] = []

    def save(status: str) -> None:
        command = "python bench/gpu_attention.py " + " ".join(sys.argv[1:] if argv is None else argv)
        common.write_json(out, {"schema": "mmfuse-gpu-attention/1", "status": status, "environment": env,
                                "command": command, "shape": {"B": B, "S": S, "H": H, "D": D, "dtype": "bf16"},
                                "records": records, "elapsed_s": round(time.monotonic() - start, 1)})

    try:
        for causal in (False, True):
            provs = providers(B, S, causal)
            check = agreement(provs, leaves, dout)
            for mode, factor in MODES.items():
                flops = factor * flops_fwd(B, S, H, D, causal)
                rows = []
                for name, fn in provs.items():
                    rec = {"causal": causal, "mode": mode, "provider": name, "flops": flops, **check}
                    if time.monotonic() - start > args.budget_s:
                        rec.update(status="skipped", reason=f"time budget of {args.budget_s:.0f} s spent")
                    else:
                        try:
                            rec.update(time_ms(runner(fn, leaves, dout, mode), device), status="ok")
                            rec["tflops"] = flops / (rec["p50_ms"] * 1e-3) / 1e12
                        except Exception as exc:  # noqa: BLE001 - a baseline that fails is recorded
                            rec.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:300])
                    rows.append(rec)
                base = next((r for r in rows if r["provider"] == "mmfuse" and r["status"] == "ok"), None)
                for rec in rows:
                    if rec["status"] != "ok":
                        print(f"{str(causal):<7} {mode:<8} {rec['provider']:<13} {rec['status']}: {rec['reason']}")
                        continue
                    if base:
                        rec["mmfuse_speedup"] = rec["p50_ms"] / base["p50_ms"]
                    print(f"{str(causal):<7} {mode:<8} {rec['provider']:<13} {rec['p50_ms']:9.3f} "
                          f"{rec['tflops']:8.1f} {rec.get('mmfuse_speedup', float('nan')):8.2f}x")
                records.extend(rows)
                save("running")
            print(f"  causal={causal}: max |mmfuse - sdpa_flash| " +
                  ", ".join(f"{k.removeprefix('max_abs_diff_')}={v:.3g}" for k, v in check.items()
                            if k.startswith("max_abs_diff")) + (f" {check['agreement_error']}"
                                                                 if "agreement_error" in check else ""))
    except KeyboardInterrupt:
        save("interrupted")
        print(f"interrupted; wrote {out}")
        return 130
    save("complete")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
