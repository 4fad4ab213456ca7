"""GPU bandwidth of the Triton-backed ops (rms_norm, add_rms_norm, swiglu, swiglu_packed, rotary,
apply_mrope) against their baselines, all measured in one run on one card: the Hugging Face eager
code, PyTorch's fused F.rms_norm where one exists, torch.compile of the eager code, Liger-Kernel
where it has the op (bench/liger.py; recorded as skipped, with the reason, where liger_kernel does
not import), and a device copy of the same size (the roofline).

Bytes follow the models of bench/ops/bench_<op>.py (each input read once, each output written
once); effective bandwidth = bytes / median time; `frac_copy_bw` divides it by the copy bandwidth
measured for this case. Times are triton.testing.do_bench medians (20th/80th percentiles too; L2
flushed between reps). Shapes are Qwen2.5-VL-3B's (hidden 2048, intermediate 11008, 16 q / 2 kv
heads of dim 128) with 8192 rows / 4096 tokens, plus hidden 3584 (7B) for rms_norm; bf16.

    python bench/gpu_bandwidth.py [--out-dir DIR] [--budget-s 120] [--dtypes bf16,fp32]
    python bench/gpu_bandwidth.py --ops rms_norm,swiglu,rotary,apply_mrope --providers liger --tag liger
        (only the Liger comparisons: a rerun when gpu_check.sh's budget skipped some; liger_kernel
        on PYTHONPATH, e.g. pip install --no-index --no-deps --target DIR bench/wheels/liger_kernel-*.whl)

Writes DIR/gpu-<card>-<date>.json (DIR: $OUT when set, else bench/results). Without a GPU,
`--device cpu --quick` runs every provider once on small shapes (a smoke test of this script).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
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

from bench import common, liger  # noqa: E402
from bench.ops import bench_rms_norm, bench_rotary, bench_swiglu  # noqa: E402
from mmfuse import ops  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
EPS = 1e-6
LIGER = "liger"
# (baseline provider, the ops it has, mode, mmfuse at least this many times faster): issue 4's
# "fwd+bwd >= 1.2x Liger-Kernel where it has the op".
TARGETS = ((LIGER, ("rms_norm", "add_rms_norm", "swiglu", "rotary", "apply_mrope"), "fwd+bwd", 1.2),)
# Order of the cases: the ops of issue 4's Liger targets first, so a run that reaches --budget-s
# skips the others.
ORDER = ("rms_norm", "swiglu", "rotary", "apply_mrope", "add_rms_norm", "swiglu_packed")
# Kept by --providers whatever it says: the agreement check compares them.
ALWAYS = ("mmfuse", "hf_eager")


class Skipped:
    """A provider that cannot run here (recorded as skipped with the reason, never timed)."""

    def __init__(self, reason: str):
        self.reason = reason

    def __call__(self, inputs):
        raise RuntimeError(self.reason)


def liger_or_skipped(fn):
    """fn where liger_kernel imports, else a Skipped saying why."""
    reason = liger.unavailable_reason()
    return Skipped(reason) if reason else fn


# ---- timing ------------------------------------------------------------------------------------

def time_ms(fn, device: torch.device) -> dict:
    if device.type == "cuda":
        from triton.testing import do_bench

        p50, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"p50_ms": p50, "p20_ms": p20, "p80_ms": p80}
    t = common.time_ms(fn, warmup=1, reps=3)
    return {k: t[k] for k in ("p50_ms", "p20_ms", "p80_ms")}


_copy_cache: dict[int, float] = {}


def copy_gbps(nbytes: int, device: torch.device) -> float:
    """Device copy bandwidth (read + write) of a buffer holding half the case's bytes."""
    n = max(nbytes // 2 // 2, 1 << 10)
    if n not in _copy_cache:
        src = torch.ones(n, dtype=torch.bfloat16, device=device)
        dst = torch.empty_like(src)
        t = time_ms(lambda: dst.copy_(src), device)
        _copy_cache[n] = 2 * n * 2 / (t["p50_ms"] * 1e-3) / 1e9
    return _copy_cache[n]


# ---- cases -------------------------------------------------------------------------------------

def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def cases(device: torch.device, dtype: torch.dtype, quick: bool):
    """(op, shape, bytes {mode: n}, make_inputs, leaves, providers {name: fn(inputs)})."""
    s = torch.finfo(dtype).bits // 8
    out = []

    for N, D in ([(256, 256)] if quick else [(8192, 2048), (8192, 3584)]):
        def make(N=N, D=D):
            return {"x": _leaf(torch.randn(N, D, dtype=dtype, device=device)),
                    "w": _leaf((1 + 0.1 * torch.randn(D, device=device)).to(dtype))}
        hf_c = torch.compile(bench_rms_norm.hf_rms_norm, dynamic=False)
        out.append(("rms_norm", f"{N}x{D}", {"fwd": 2 * N * D * s + D * s, "fwd+bwd": 5 * N * D * s + 3 * D * s},
                    make, ("x", "w"), {
                        "mmfuse": lambda i: ops.rms_norm(i["x"], i["w"], EPS),
                        "hf_eager": lambda i: bench_rms_norm.hf_rms_norm(i["x"], i["w"]),
                        "torch_fused": lambda i: F.rms_norm(i["x"], (i["x"].shape[-1],), i["w"], EPS),
                        "torch_compile": lambda i, f=hf_c: f(i["x"], i["w"]),
                        LIGER: liger_or_skipped(lambda i: liger.rms_norm(i["x"], i["w"], EPS))}))
    N, D = (256, 256) if quick else (8192, 2048)

    def make_add(N=N, D=D):
        return {"x": _leaf(torch.randn(N, D, dtype=dtype, device=device)),
                "r": _leaf(torch.randn(N, D, dtype=dtype, device=device)),
                "w": _leaf((1 + 0.1 * torch.randn(D, device=device)).to(dtype))}
    hf_c = torch.compile(bench_rms_norm.hf_add_rms_norm, dynamic=False)
    out.append(("add_rms_norm", f"{N}x{D}", {"fwd": 4 * N * D * s + D * s, "fwd+bwd": 8 * N * D * s + 3 * D * s},
                make_add, ("x", "r", "w"), {
                    "mmfuse": lambda i: ops.add_rms_norm(i["x"], i["r"], i["w"], EPS),
                    "hf_eager": lambda i: bench_rms_norm.hf_add_rms_norm(i["x"], i["r"], i["w"]),
                    "torch_fused": lambda i: bench_rms_norm.torch_add_rms_norm(i["x"], i["r"], i["w"]),
                    "torch_compile": lambda i, f=hf_c: f(i["x"], i["r"], i["w"]),
                    LIGER: liger_or_skipped(lambda i: liger.add_rms_norm(i["x"], i["r"], i["w"], EPS))}))

    M, Fdim = (256, 512) if quick else (8192, 11008)
    nbytes = {"fwd": 3 * M * Fdim * s, "fwd+bwd": 8 * M * Fdim * s}

    def make_glu(M=M, Fdim=Fdim):
        return {"gate": _leaf(torch.randn(M, Fdim, dtype=dtype, device=device)),
                "up": _leaf(torch.randn(M, Fdim, dtype=dtype, device=device)),
                "x": _leaf(torch.randn(M, 2 * Fdim, dtype=dtype, device=device))}
    hf_c = torch.compile(bench_swiglu.hf_swiglu, dynamic=False)
    out.append(("swiglu", f"{M}x{Fdim}", nbytes, make_glu, ("gate", "up"), {
        "mmfuse": lambda i: ops.swiglu(i["gate"], i["up"]),
        "hf_eager": lambda i: bench_swiglu.hf_swiglu(i["gate"], i["up"]),
        "torch_compile": lambda i, f=hf_c: f(i["gate"], i["up"]),
        LIGER: liger_or_skipped(lambda i: liger.swiglu(i["gate"], i["up"]))}))
    hf_c = torch.compile(bench_swiglu.hf_swiglu_packed, dynamic=False)
    out.append(("swiglu_packed", f"{M}x2x{Fdim}", nbytes, make_glu, ("x",), {
        "mmfuse": lambda i: ops.swiglu_packed(i["x"]),
        "hf_eager": lambda i: bench_swiglu.hf_swiglu_packed(i["x"]),
        "torch_compile": lambda i, f=hf_c: f(i["x"])}))

    T, Hq, Hk, Dh = (256, 4, 2, 64) if quick else (4096, 16, 2, 128)
    R = Dh // 2
    E = T * (Hq + Hk) * Dh
    inv = bench_rotary.inv_freq(Dh).to(device)
    section = bench_rotary.mrope_section(Dh)

    def make_rope(T=T, Hq=Hq, Hk=Hk, Dh=Dh):
        pos = bench_rotary.multimodal_position_ids(T).to(device)
        freqs = torch.arange(T, dtype=torch.float32, device=device)[:, None] * inv      # [T, R]
        mfreqs = pos[..., None].float() * inv                                           # [3, T, R]
        return {"q": _leaf(torch.randn(T, Hq, Dh, dtype=dtype, device=device)),
                "k": _leaf(torch.randn(T, Hk, Dh, dtype=dtype, device=device)),
                "cos": freqs.cos(), "sin": freqs.sin(),
                "cos_hf": torch.cat((freqs, freqs), -1).cos().to(dtype),
                "sin_hf": torch.cat((freqs, freqs), -1).sin().to(dtype),
                "position_ids": pos,
                "mcos_hf": torch.cat((mfreqs, mfreqs), -1).cos().to(dtype),
                "msin_hf": torch.cat((mfreqs, mfreqs), -1).sin().to(dtype)}
    cs, ps = 2 * T * R * 4, 3 * T * 8 + R * 4
    hf_c = torch.compile(bench_rotary.hf_apply_rotary_pos_emb, dynamic=False)
    out.append(("rotary", f"{T}x({Hq}+{Hk})x{Dh}", {"fwd": 2 * E * s + cs, "fwd+bwd": 4 * E * s + 2 * cs},
                make_rope, ("q", "k"), {
                    "mmfuse": lambda i: (ops.rotary(i["q"], i["cos"], i["sin"]),
                                         ops.rotary(i["k"], i["cos"], i["sin"])),
                    "hf_eager": lambda i: bench_rotary.hf_apply_rotary_pos_emb(i["q"], i["k"], i["cos_hf"],
                                                                               i["sin_hf"]),
                    "torch_compile": lambda i, f=hf_c: f(i["q"], i["k"], i["cos_hf"], i["sin_hf"]),
                    LIGER: liger_or_skipped(lambda i: liger.rotary(i["q"], i["k"], i["cos_hf"], i["sin_hf"]))}))
    hf_c = torch.compile(bench_rotary.hf_apply_multimodal_rotary_pos_emb, dynamic=False)
    out.append(("apply_mrope", f"{T}x({Hq}+{Hk})x{Dh}", {"fwd": 2 * E * s + ps, "fwd+bwd": 4 * E * s + 2 * ps},
                make_rope, ("q", "k"), {
                    "mmfuse": lambda i: ops.apply_mrope(i["q"], i["k"], i["position_ids"], inv, section),
                    "hf_eager": lambda i: bench_rotary.hf_apply_multimodal_rotary_pos_emb(
                        i["q"], i["k"], i["mcos_hf"], i["msin_hf"], section),
                    "torch_compile": lambda i, f=hf_c: f(i["q"], i["k"], i["mcos_hf"], i["msin_hf"], section),
                    LIGER: liger_or_skipped(lambda i: liger.apply_mrope(i["q"], i["k"], i["mcos_hf"], i["msin_hf"],
                                                                        section))}))
    return out


def _outputs(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def runner(fn, inputs: dict, leaves: tuple[str, ...], mode: str):
    if mode == "fwd":
        return lambda: fn(inputs)
    probe = _outputs(fn(inputs))
    grads = tuple(torch.randn_like(o) for o in probe)
    del probe
    targets = [inputs[n] for n in leaves]
    return lambda: torch.autograd.grad(_outputs(fn(inputs)), targets, grads)


# ---- run ---------------------------------------------------------------------------------------

def card_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    found = re.search(r"\b([a-z]\d{2,4}[a-z]?)\b", name)  # h100, h200, a100, l40s, b200
    return found.group(1) if found else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def environment(device: torch.device) -> dict:
    env = common.environment()
    env["mmfuse_commit"] = os.environ.get("MMFUSE_COMMIT") or env.get("git_commit")
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update({"gpu": p.name, "gpu_memory_gib": round(p.total_memory / 2**30, 1),
                    "gpu_sm_count": p.multi_processor_count, "cuda": torch.version.cuda,
                    "cudnn": torch.backends.cudnn.version()})
    return env


def _max_diff(got, want) -> float:
    return max(((a.float() - b.float()).abs().max().item() for a, b in zip(_outputs(got), _outputs(want))),
               default=0.0)


def _fresh(inputs: dict) -> dict:
    """Copies of the inputs: Liger's RoPE kernels rotate q and k in place (forward and backward)."""
    return {k: v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
            for k, v in inputs.items()}


def run_case(case, dname: str, device: torch.device, records: list) -> None:
    """Times every provider of one case in both modes, appending records and printing a row each."""
    op, shape, nbytes, make, leaves, providers = case
    inputs = make()
    # Agreement with the eager code on this very input (a check that the kernels ran correctly).
    diffs = {}
    with torch.no_grad():
        want = providers["hf_eager"](inputs)
        diffs["max_abs_diff_mmfuse_vs_eager"] = _max_diff(providers["mmfuse"](inputs), want)
        if LIGER in providers and not isinstance(providers[LIGER], Skipped):
            try:
                diffs["max_abs_diff_liger_vs_eager"] = _max_diff(providers[LIGER](_fresh(inputs)), want)
            except Exception as exc:  # noqa: BLE001 - the timing below records the failure
                diffs["max_abs_diff_liger_vs_eager"] = f"{type(exc).__name__}: {exc}"[:300]
        del want
    for mode in ("fwd", "fwd+bwd"):
        copy = copy_gbps(nbytes[mode], device)
        times = {}
        for name, fn in providers.items():
            if isinstance(fn, Skipped):
                times[name], status, reason = None, "skipped", fn.reason
            else:
                try:
                    times[name] = time_ms(runner(fn, inputs, leaves, mode), device)
                    status, reason = "ok", None
                except Exception as exc:  # a baseline that fails is recorded, not fatal
                    times[name], status, reason = None, "failed", f"{type(exc).__name__}: {exc}"[:300]
            t = times[name]
            rec = {"op": op, "shape": shape, "dtype": dname, "mode": mode, "provider": name, "status": status,
                   "reason": reason, "bytes": nbytes[mode], "copy_gbps": copy, **diffs}
            if t is not None:
                gbps = nbytes[mode] / (t["p50_ms"] * 1e-3) / 1e9
                rec.update(t, gbps=gbps, frac_copy_bw=gbps / copy)
            records.append(rec)
        base = times.get("mmfuse")
        for rec in records[-len(providers):]:
            t = times.get(rec["provider"])
            if base and t:
                rec["mmfuse_speedup"] = t["p50_ms"] / base["p50_ms"]
            if t:
                print(f"{op:<14} {shape:<20} {dname:<5} {mode:<8} {rec['provider']:<14} {t['p50_ms']:8.3f} "
                      f"{rec['gbps']:7.0f} {100 * rec['frac_copy_bw']:6.0f}% "
                      f"{rec.get('mmfuse_speedup', float('nan')):8.2f}x")
            else:
                print(f"{op:<14} {shape:<20} {dname:<5} {mode:<8} {rec['provider']:<14} {rec['status']}: "
                      f"{rec['reason']}")


def targets(records: list[dict]) -> list[dict]:
    """One row per (op, shape, dtype, target) of TARGETS: value = baseline p50 / mmfuse p50 (how many
    times faster mmfuse is), status met / NOT met / n/a (with the reason; never met without numbers)."""
    rows = []
    cases = list(dict.fromkeys((r["op"], r["shape"], r["dtype"]) for r in records))
    for op, shape, dtype in cases:
        rs = [r for r in records if (r["op"], r["shape"], r["dtype"]) == (op, shape, dtype)]
        for provider, ops, mode, threshold in TARGETS:
            if op not in ops:
                continue
            mine = next((r for r in rs if r.get("provider") == "mmfuse" and r.get("mode") == mode), None)
            other = next((r for r in rs if r.get("provider") == provider and r.get("mode") == mode), None)
            row = {"op": op, "shape": shape, "dtype": dtype,
                   "target": f"{mode} >= {threshold:g}x faster than {provider}", "baseline": provider, "mode": mode, "threshold": threshold, "value": None, "detail": ""}
            if all(r.get("status") == "skipped" and "provider" not in r for r in rs):
                row.update(status="n/a", reason=f"case skipped: {rs[0]['reason']}")
            elif mine is None or other is None or mine["status"] != "ok" or other["status"] != "ok":
                bad = mine if mine is None or mine["status"] != "ok" else other
                row.update(status="n/a", reason=f"mmfuse or {provider} not measured" if bad is None else
                           f"{bad['provider']} {bad['status']}: {bad['reason']}")
            else:
                value = other["p50_ms"] / mine["p50_ms"]
                row.update(value=value, status="met" if value >= threshold else "NOT met", reason=None,
                           detail=f"{provider} {other['p50_ms']:.3f} ms / mmfuse {mine['p50_ms']:.3f} ms")
            rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path,
                   default=Path(os.environ.get("OUT") or common.REPO_ROOT / "bench" / "results"))
    p.add_argument("--budget-s", type=float, default=120.0,
                   help="no new case starts after this many seconds (the rest is recorded as skipped)")
    p.add_argument("--dtypes", default="bf16", help="comma-separated: bf16, fp32")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test with --quick")
    p.add_argument("--quick", action="store_true", help="small shapes (smoke test; timings not meaningful)")
    p.add_argument("--ops", default=None, help=f"comma list of ops (default: all of {', '.join(ORDER)})")
    p.add_argument("--providers", default=None,
                   help="comma list of baselines to time besides mmfuse and hf_eager (default: all), e.g. liger")
    p.add_argument("--tag", default=None, help="appended to the output file name: gpu-<card>-<date>-<tag>.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu --quick for a smoke test", file=sys.stderr)
        return 2
    ops = set(args.ops.split(",")) if args.ops else set(ORDER)
    keep = set(ALWAYS) | set(args.providers.split(",")) if args.providers else None

    def selected(device, dtype):
        """The cases of --ops in ORDER, with the providers of --providers."""
        out = sorted((c for c in cases(device, dtype, args.quick) if c[0] in ops), key=lambda c: ORDER.index(c[0]))
        return [(*c[:5], {n: f for n, f in c[5].items() if keep is None or n in keep}) for c in out]

    start = time.monotonic()
    env = environment(device)
    print(f"device {env.get('gpu', device)}  torch {torch.__version__}  triton {env['triton']}  "
          f"commit {env['mmfuse_commit']}")
    print(f"{'op':<14} {'shape':<20} {'dtype':<5} {'mode':<8} {'provider':<14} {'ms p50':>8} {'GB/s':>7} "
          f"{'% copy':>7} {'mmfuse x':>9}")
    records = []
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    out = args.out_dir / f"gpu-{card_slug(device)}-{date}{'-' + args.tag if args.tag else ''}.json"

    def save(status: str) -> None:
        # Rewritten after every case, so a run stopped by a time limit keeps what it measured.
        command = "python bench/gpu_bandwidth.py " + " ".join(sys.argv[1:] if argv is None else argv)
        common.write_json(out, {"schema": "mmfuse-gpu-bandwidth/1", "status": status, "environment": env,
                                "command": command,
                                "copy_gbps": {str(2 * k * 2): v for k, v in sorted(_copy_cache.items())},
                                "liger_kernel": liger.version(), "liger_unavailable": liger.unavailable_reason(),
                                "records": records, "targets": targets(records),
                                "elapsed_s": round(time.monotonic() - start, 1)})

    try:
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname.strip()]
            for case in selected(device, dtype):
                if time.monotonic() - start > args.budget_s:
                    records.append({"op": case[0], "shape": case[1], "dtype": dname, "status": "skipped",
                                    "reason": f"time budget of {args.budget_s:.0f} s spent"})
                    print(f"{case[0]:<14} {case[1]:<20} {dname:<5} skipped (time budget)")
                    continue
                run_case(case, dname, device, records)
                save("running")
    except KeyboardInterrupt:
        save("interrupted")
        print(f"interrupted; wrote {out}")
        return 130
    save("complete")
    for row in targets(records):
        value = "" if row["value"] is None else f"{row['value']:.2f}x "
        print(f"target {row['op']} {row['shape']} {row['dtype']}: {row['target']}: {row['status']} {value}"
              f"{row['reason'] or row['detail']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
