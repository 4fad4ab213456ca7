"""GPU training step of Qwen2.5-VL-3B: mmfuse against transformers and transformers + Liger-Kernel, on
the same weights and the same sample, in one run on one card (issue 5).

Setup (the same for every provider):
  model    the "3b" preset of mmfuse.models.qwen2_5_vl (Qwen2.5-VL-3B-Instruct's config.json numbers),
           transformers' random initialisation (seed 0), built once on the device, cast to bf16 and
           saved as safetensors in a temporary directory; every provider loads that file
  dtype    pure bf16 parameters, gradients and AdamW states: model.to(bfloat16) +
           torch.optim.AdamW(lr 1e-5, fused=True), as a plain transformers training loop runs it (no
           fp32 master weights, no autocast)
  sample   one sequence of 4096 tokens: 512 text, <|vision_start|>, one 896x896 image ((896/28)^2 =
           1024 merged tokens, 4096 patches), <|vision_end|>, 2558 text; labels are the text tokens
           (image pads ignored)
  step     forward + backward of the mean next-token loss + optimizer.step() + zero_grad(set_to_none)
Providers, each in its own subprocess (a clean CUDA allocator, so peaks do not mix) and time limit:
  mmfuse            mmfuse's model: Triton kernels, packed cu_seqlens varlen attention, fused linear CE
  hf                Qwen2_5_VLForConditionalGeneration, attn_implementation="sdpa" (PyTorch's default
                    SDPA backend), mm_token_type_ids given so it builds the M-RoPE positions itself
  hf_liger          the same after liger_kernel.transformers.apply_liger_kernel_to_qwen2_5_vl(model=...)
                    from the carried wheel (bench/wheels/); skipped with the reason where it does not import.
                    What it replaced is recorded ("liger_patched"): with transformers >= 5 its RoPE patch
                    has no effect (the attention no longer calls apply_multimodal_rotary_pos_emb)
  mmfuse_recompute  mmfuse with full recompute of every ViT block and decoder layer (memory-bound users)
Measured: the step-0 loss (before any update: the providers must agree, LOSS_RTOL), step times after
`--warmup` untimed steps (torch.cuda.synchronize around each; p50/p20/p80), tokens/s = 4096 / p50,
MFU = mmfuse.train.metrics.step_flops (6·N per token of each module + attention, no recompute) /
(p50 x peak), peak = torch.cuda.max_memory_allocated over the whole child (weights, gradients, AdamW
states and activations). Peak: 989 TFLOP/s, H100/H200 SXM dense bf16 (KNOWN_PEAK_TFLOPS;
--peak-tflops for other cards).

Targets (issue 5; "targets" in the JSON, n/a with the reason when a side is missing): mmfuse's tokens/s
>= 2x hf's and >= 1.5x hf_liger's, MFU >= 40%, peak memory <= 0.7x hf's.

Expected on an H200 (derived, not measured): ~101 TFLOP per step (text 6·3.09e9·4096 = 76, vision
6·0.67e9·4096 = 16.5, attention 8.5); anchors: transformers ~0.56 s/step (7.3k tokens/s, 18% MFU,
59 GB), with Liger ~0.59 s (6.9k, 44 GB); mmfuse at 40% MFU would be ~0.26 s. Per provider: ~10 s to
import and load 7.5 GB of weights, first step ~5 s for transformers and ~30-60 s for mmfuse (Triton
compiles ~30 kernels; cached in ~/.triton for reruns), 2 warm-up + 8 timed steps ~3-6 s.

    python bench/gpu_model_step.py [--out-dir DIR] [--providers mmfuse,hf,hf_liger,mmfuse_recompute]
    python bench/gpu_model_step.py --device cpu --quick      # tiny model, end to end on the CPU (smoke test)

Writes DIR/gpu-model-<card>-<date>.json (DIR: $OUT when set, else bench/results).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import subprocess
import sys
import tempfile
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

from bench import common, liger  # noqa: E402
from bench.gpu_bandwidth import card_slug, environment  # noqa: E402
from bench.models.bench_qwen2_5_vl_step import Sample, build_batch, hf_config  # noqa: E402
from mmfuse.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig  # noqa: E402
from mmfuse.train.metrics import device_peak_tflops, step_flops  # noqa: E402

SCHEMA = "mmfuse-gpu-model-step/1"
MMFUSE, MMFUSE_RECOMPUTE, HF, HF_LIGER = "mmfuse", "mmfuse_recompute", "hf", "hf_liger"
PROVIDERS = (MMFUSE, HF, HF_LIGER, MMFUSE_RECOMPUTE)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Step-0 loss agreement with mmfuse's: fp32 as the CPU step benchmark; bf16 rounding of ~300 matmuls
# in a different order moves the loss (~ln V = 11.9 here) by well under 1%.
LOSS_RTOL = {"fp32": 1e-4, "bf16": 1e-2}
LAYOUT = (Sample(512, (896, 896), 2558),)        # 512 + 1 + 1024 + 1 + 2558 = 4096 tokens
QUICK_LAYOUT = (Sample(40, (112, 112), 70),)     # tiny model: 40 + 1 + 16 + 1 + 70 = 128 tokens
# Hard limit per provider subprocess (seconds), within what is left of --limit-s: mmfuse's first run
# compiles its Triton kernels.
PROVIDER_LIMIT_S = {MMFUSE: 120, HF: 75, HF_LIGER: 90, MMFUSE_RECOMPUTE: 60}
MIN_START_S = 30             # a provider is not started with less time than this left
# (provider, what, at least / at most, threshold)
TARGETS = (("tokens_per_s", HF, ">=", 2.0), ("tokens_per_s", HF_LIGER, ">=", 1.5), ("mfu", None, ">=", 0.40),
           ("peak_bytes", HF, "<=", 0.7))


# ---- the child: one provider -------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_model(provider: str, weights: Path, device: torch.device, dtype: torch.dtype):
    if provider in (MMFUSE, MMFUSE_RECOMPUTE):
        model = Qwen2_5_VL.from_pretrained(weights, dtype=dtype, device=device)
        if provider == MMFUSE_RECOMPUTE:
            from mmfuse.models.common.recompute import RecomputeConfig

            full = RecomputeConfig("full", "uniform", 1)
            model.set_recompute(vision=full, text=full)
        return model.train()
    import transformers

    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        weights, attn_implementation="sdpa", dtype=dtype).to(device)
    return model.train()


def apply_liger(model) -> dict:
    """apply_liger_kernel_to_qwen2_5_vl(model=model) with its defaults, and what it replaced."""
    import inspect

    from liger_kernel.transformers import LigerRMSNorm, LigerSwiGLUMLP, apply_liger_kernel_to_qwen2_5_vl
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf_mod

    apply_liger_kernel_to_qwen2_5_vl(model=model)

    def bound_to(module, fn) -> bool:
        f = module.__dict__.get("forward")
        return getattr(f, "__func__", None) is fn

    mods = list(model.modules())
    attention_src = inspect.getsource(hf_mod.Qwen2_5_VLAttention.forward)
    return {"rms_norm_modules": sum(bound_to(m, LigerRMSNorm.forward) for m in mods),
            "swiglu_mlps": sum(bound_to(m, LigerSwiGLUMLP.forward) for m in mods),
            "fused_linear_cross_entropy": "forward" in model.__dict__,
            # Liger patches modeling_qwen2_5_vl.apply_multimodal_rotary_pos_emb; transformers >= 5 builds
            # the M-RoPE cos/sin in Qwen2_5_VLRotaryEmbedding and calls apply_rotary_pos_emb instead.
            "mrope_in_use": "apply_multimodal_rotary_pos_emb" in attention_src}


def make_inputs(cfg: Qwen2_5_VLConfig, layout, device: torch.device, dtype: torch.dtype, seed: int):
    """(mmfuse kwargs, transformers kwargs, tokens, label tokens): one sample, the same for both."""
    batch = build_batch(cfg, layout, seed)

    def move(d: dict) -> dict:
        return {k: v.to(device, dtype if k == "pixel_values" else v.dtype) for k, v in d.items()}

    packed = move({**batch.packed, "labels": batch.labels})
    return packed, move(batch.per_sample[0]), batch.shapes["tokens"], batch.num_label_tokens


def train_step(provider: str, model, inputs: dict, optimizer) -> torch.Tensor:
    if provider in (MMFUSE, MMFUSE_RECOMPUTE):
        loss = model(**inputs).loss
    else:
        loss = model(**inputs, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def run_provider(args) -> dict:
    """Everything one provider measures, in this (fresh) process."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = Qwen2_5_VLConfig.preset("tiny" if args.quick else "3b")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out: dict = {"provider": args.child}
    t0 = time.perf_counter()
    model = load_model(args.child, args.weights, device, dtype)
    if args.child == HF_LIGER:
        out["liger_patched"] = apply_liger(model)
    sync(device)
    out["load_s"] = time.perf_counter() - t0
    out["weights_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    mm_inputs, hf_inputs, tokens, label_tokens = make_inputs(cfg, QUICK_LAYOUT if args.quick else LAYOUT, device, dtype,
                                                  args.seed)
    inputs = mm_inputs if args.child in (MMFUSE, MMFUSE_RECOMPUTE) else hf_inputs
    # fused=True: the whole update in a few multi-tensor kernels (transformers' optim="adamw_torch_fused").
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    losses, times = [], []
    timed_start = None
    for i in range(args.warmup + args.steps):
        sync(device)
        t = time.perf_counter()
        loss = train_step(args.child, model, inputs, optimizer)
        sync(device)
        dt = time.perf_counter() - t
        losses.append(float(loss))
        if i == 0:
            out["first_step_s"] = dt             # includes kernel compilation and autotuning
        if i < args.warmup:
            continue
        timed_start = timed_start or t
        times.append(dt)
        if time.perf_counter() - timed_start > args.timed_s:
            break                                # at least one timed step, then the time limit
    s = sorted(times)
    p50 = common.quantile(s, 0.5)
    out.update(status="ok", loss_step0=losses[0], losses=losses, step_s=times, reps=len(times), tokens=tokens,
               label_tokens=label_tokens, p50_ms=1e3 * p50, p20_ms=1e3 * common.quantile(s, 0.2),
               p80_ms=1e3 * common.quantile(s, 0.8), tokens_per_s=tokens / p50)
    if device.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    else:
        from mmfuse.train.metrics import peak_memory_bytes

        out["peak_bytes"] = peak_memory_bytes(device)      # max RSS, imports included: a smoke-test figure
    return out


# ---- the parent: weights, subprocesses, summary ----------------------------------------------------

def write_weights(cfg: Qwen2_5_VLConfig, out_dir: Path, device: torch.device, dtype: torch.dtype,
                  seed: int) -> None:
    """transformers' initialisation, built on the device (seconds for 3.75B parameters on a GPU, minutes
    on a CPU), cast to `dtype` and saved where every provider loads it from."""
    import transformers

    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.Qwen2_5_VLForConditionalGeneration(hf_config(cfg))
    model.to(dtype).save_pretrained(out_dir)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def model_flops(cfg: Qwen2_5_VLConfig, layout, seed: int) -> tuple[float, dict]:
    """Model FLOPs of one step (mmfuse.train.metrics' definition) and the parameter counts, from a
    meta-device model (no memory)."""
    with torch.device("meta"):
        model = Qwen2_5_VL(cfg)
    batch = build_batch(cfg, layout, seed)
    named = dict(model.named_parameters())
    params = {"total": sum(p.numel() for p in named.values()),
              "vision": sum(p.numel() for n, p in named.items() if n.startswith("visual.")),
              "text_embedding": model.model.embed_tokens.weight.numel()}
    return step_flops(model, [batch.packed]), params


def run_child(provider: str, args, weights: Path, limit_s: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", provider, "--weights", str(weights),
            "--child-out", str(out), "--device", args.device, "--dtype", args.dtype, "--seed", str(args.seed),
            "--warmup", str(args.warmup), "--steps", str(args.steps), "--timed-s", str(args.timed_s)]
    if args.quick:
        argv.append("--quick")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=limit_s)
        if proc.returncode != 0:
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip().strip("^~")]
            return {"provider": provider, "status": "failed", "reason": " | ".join(lines[-3:])[-600:]}
        rec = common.read_json(out)
    except subprocess.TimeoutExpired:
        return {"provider": provider, "status": "timeout", "reason": f"time limit of {limit_s:.0f} s reached"}
    finally:
        out.unlink(missing_ok=True)
    rec["wall_s"] = time.perf_counter() - t0
    return rec


def check_losses(records: list[dict], rtol: float) -> dict:
    ok = {r["provider"]: r["loss_step0"] for r in records if r.get("status") == "ok"}
    if MMFUSE not in ok:
        return {"status": "n/a", "reason": "mmfuse not measured", "rtol": rtol}
    ref = ok[MMFUSE]
    rel = {p: abs(v - ref) / abs(ref) for p, v in ok.items() if p != MMFUSE}
    bad = {p: v for p, v in rel.items() if v > rtol}
    return {"status": "MISMATCH" if bad else "ok", "rtol": rtol, "reference": MMFUSE, "rel_diff": rel,
            "reason": f"step-0 loss differs from mmfuse's beyond rtol {rtol}: {sorted(bad)}" if bad else None}


def targets(records: list[dict]) -> list[dict]:
    """One row per TARGETS entry: value (mmfuse / baseline, or mmfuse's MFU), status met / NOT met /
    n/a (with the reason; never met without both numbers)."""
    by = {r["provider"]: r for r in records}
    rows = []
    for key, baseline, cmp, threshold in TARGETS:
        target = {"mfu": f"MFU >= {100 * threshold:.0f}%",
                  "tokens_per_s": f"tokens/s >= {threshold:g}x {baseline}'s",
                  "peak_bytes": f"peak memory <= {threshold:g}x {baseline}'s"}[key]
        row = {"target": target, "baseline": baseline, "threshold": threshold, "cmp": cmp, "value": None,
               "detail": "", "reason": None}
        sides = [(MMFUSE, by.get(MMFUSE))] + ([(baseline, by.get(baseline))] if baseline else [])
        missing = next(((n, r) for n, r in sides if r is None or r.get("status") != "ok" or r.get(key) is None),
                       None)
        if missing:
            n, r = missing
            row.update(status="n/a", reason=f"{n} not run" if r is None else
                       f"{n} {r['status']}: {r.get('reason')}" if r.get("status") != "ok" else
                       f"{n}: no {key} (no known peak for this device)")
            rows.append(row)
            continue
        mine, other = by[MMFUSE], by.get(baseline)
        if key == "mfu":
            value, detail = mine["mfu"], f"{mine['tflops']:.0f} of {mine['peak_tflops']:.0f} TFLOP/s"
        elif key == "tokens_per_s":
            value, detail = mine[key] / other[key], f"mmfuse {mine[key]:.0f} / {baseline} {other[key]:.0f} tokens/s"
        else:
            value = mine[key] / other[key]
            detail = f"mmfuse {mine[key] / 2**30:.1f} / {baseline} {other[key] / 2**30:.1f} GiB"
        met = value >= threshold if cmp == ">=" else value <= threshold
        rows.append({**row, "value": value, "status": "met" if met else "NOT met", "detail": detail})
    return rows


def describe(rec: dict) -> str:
    """One printed line per provider."""
    if rec.get("status") != "ok":
        return f"{rec['provider']:<17} {rec['status']}: {rec['reason']}"
    mfu = f"MFU {100 * rec['mfu']:.1f}%" if "mfu" in rec else "MFU n/a"
    line = (f"{rec['provider']:<17} loss {rec['loss_step0']:.5f}  {rec['p50_ms']:8.1f} ms  "
            f"{rec['tokens_per_s']:8.0f} tokens/s  {rec['tflops']:6.1f} TFLOP/s  {mfu}  peak "
            f"{rec['peak_bytes'] / 2**30:.1f} GiB  (load {rec['load_s']:.0f} s, "
            f"first step {rec['first_step_s']:.1f} s)")
    return line + (f"  liger: {rec['liger_patched']}" if "liger_patched" in rec else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path,
                   default=Path(os.environ.get("OUT") or common.REPO_ROOT / "bench" / "results"))
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {', '.join(PROVIDERS)}")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test with --quick")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--quick", action="store_true", help="tiny model, 128 tokens (smoke test; timings not meaningful)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2, quick 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps at most (default 8, quick 2)")
    p.add_argument("--timed-s", type=float, default=20.0, help="stop timing a provider after this many seconds")
    p.add_argument("--limit-s", type=float, default=230.0,
                   help="the whole run's time: a provider gets what is left, at most its own limit")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (default: known cards)")
    p.add_argument("--tmp-dir", type=Path, default=None, help="where the weights file goes (default: TMPDIR)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=PROVIDERS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--weights", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 8)
    if args.child:
        common.write_json(args.child_out, run_provider(args))
        return 0

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu --quick for a smoke test", file=sys.stderr)
        return 2
    providers = [s.strip() for s in args.providers.split(",") if s.strip()]
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        raise SystemExit(f"--providers: unknown {unknown}; choose from {list(PROVIDERS)}")
    start = time.monotonic()
    import transformers

    transformers.logging.set_verbosity_error()   # config-conversion notices, not results
    transformers.logging.disable_progress_bar()
    env = environment(device)
    env.update(transformers=transformers.__version__, liger_kernel=liger.version(),
               liger_unavailable=liger.unavailable_reason())
    cfg = Qwen2_5_VLConfig.preset("tiny" if args.quick else "3b")
    layout = QUICK_LAYOUT if args.quick else LAYOUT
    flops, params = model_flops(cfg, layout, args.seed)
    peak = device_peak_tflops(device, args.peak_tflops)
    print(f"device {env.get('gpu', device)}  torch {torch.__version__}  triton {env['triton']}  transformers "
          f"{env['transformers']}  liger_kernel {env['liger_kernel']}  commit {env['mmfuse_commit']}")
    print(f"Qwen2.5-VL {'tiny' if args.quick else '3b'}: {params['total'] / 1e9:.3g}B params, "
          f"{flops / 1e12:.3g} TFLOP per step, {args.dtype}, device peak {peak or 'unknown'} TFLOP/s")
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    out = args.out_dir / f"gpu-model-{card_slug(device)}-{date}.json"
    records: list[dict] = []
    payload = {"schema": SCHEMA, "environment": env, "command": "python bench/gpu_model_step.py " + " ".join(
        sys.argv[1:] if argv is None else argv),
        "setup": {"model": "tiny" if args.quick else "3b", "dtype": args.dtype, "params": params,
                  "sample": [vars(s) for s in layout], "flops_per_step": flops, "peak_tflops": peak or None,
                  "optimizer": "torch.optim.AdamW(lr=1e-5, fused=True), states in the parameter dtype",
                  "warmup": args.warmup, "steps": args.steps, "timed_s": args.timed_s, "seed": args.seed},
        "records": records}

    def save(status: str) -> None:
        payload.update(status=status, loss_check=check_losses(records, LOSS_RTOL[args.dtype]),
                       targets=targets(records), elapsed_s=round(time.monotonic() - start, 1))
        common.write_json(out, payload)

    try:
        with tempfile.TemporaryDirectory(prefix="mmfuse-gpu-model-", dir=args.tmp_dir) as tmp:
            t0 = time.monotonic()
            write_weights(cfg, Path(tmp), device, dtype, args.seed)
            payload["setup"]["weights_write_s"] = round(time.monotonic() - t0, 1)
            print(f"weights written in {payload['setup']['weights_write_s']} s")
            for provider in providers:
                left = args.limit_s - (time.monotonic() - start)
                if provider == HF_LIGER and liger.unavailable_reason():
                    rec = {"provider": provider, "status": "skipped", "reason": liger.unavailable_reason()}
                elif left < MIN_START_S:
                    rec = {"provider": provider, "status": "skipped", "reason": f"{left:.0f} s left of --limit-s"}
                else:
                    rec = run_child(provider, args, Path(tmp), min(PROVIDER_LIMIT_S[provider], left))
                if rec.get("status") == "ok":
                    rec["tflops"] = flops / (rec["p50_ms"] * 1e-3) / 1e12
                    if peak:
                        rec.update(peak_tflops=peak, mfu=rec["tflops"] / peak)
                print(describe(rec), flush=True)
                records.append(rec)
                save("running")
    except KeyboardInterrupt:                      # the time limit of gpu_model_check.sh: keep what was measured
        save("interrupted")
        print(f"interrupted; wrote {out}")
        return 130
    save("complete")
    check = payload["loss_check"]
    print(f"step-0 loss vs mmfuse: {check['status']} (rtol {check['rtol']}) "
          + ", ".join(f"{p} {v:.2e}" for p, v in (check.get("rel_diff") or {}).items()))
    for row in payload["targets"]:
        value = "" if row["value"] is None else f"{row['value']:.2f} "
        print(f"target {row['target']}: {row['status']} {value}{row['reason'] or row['detail']}")
    print(f"wrote {out}")
    return 1 if check["status"] == "MISMATCH" else 0


if __name__ == "__main__":
    raise SystemExit(main())
