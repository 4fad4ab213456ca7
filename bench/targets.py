"""The CPU targets every op is checked against (see DESIGN.md, Benchmarks):

  1. fp32 fwd+bwd at least 2x faster than torch.compile of the Hugging Face code
  2. fp32 fwd+bwd at least 50% of the copy bandwidth measured in the same run
  3. bf16 at least 1.5x faster than fp32 on the same shape (each mode)

Checked on mmfuse's records; a target whose inputs are missing (op skipped, provider failed) is
reported as n/a with the reason, never as met.
"""

from __future__ import annotations

from bench.harness import MMFUSE

MIN_SPEEDUP_VS_COMPILE = 2.0
MIN_FRAC_COPY_BW = 0.5
MIN_BF16_SPEEDUP = 1.5


def _find(records, **match):
    for r in records:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _setting_keys(records):
    """(op, threads, allocator) combinations, in first-seen order."""
    seen = []
    for r in records:
        key = (r["op"], r["threads"], r["allocator"])
        if key not in seen:
            seen.append(key)
    return seen


def check(records: list[dict]) -> list[dict]:
    """One row per (op, threads, allocator, target): value, threshold, status met / NOT met / n/a."""
    rows = []
    for op, threads, allocator in _setting_keys(records):
        rs = [r for r in records if r["op"] == op and r["threads"] == threads and r["allocator"] == allocator]
        base = {"op": op, "threads": threads, "allocator": allocator}
        mine = [r for r in rs if r["provider"] == MMFUSE]
        if mine and all(r["status"] == "skipped" for r in mine):
            rows.append({**base, "target": "all targets", "value": None, "threshold": None, "unit": "",
                         "status": "n/a", "reason": f"skipped: {mine[0]['reason']}", "detail": ""})
            continue

        def row(target, value, threshold, unit, reason=None, detail=""):
            status = "n/a" if value is None else ("met" if value >= threshold else "NOT met")
            rows.append({**base, "target": target, "value": value, "threshold": threshold, "unit": unit,
                         "status": status, "reason": reason, "detail": detail})

        mm = _find(rs, provider=MMFUSE, dtype="fp32", mode="fwd+bwd")
        tc = _find(rs, provider="torch_compile", dtype="fp32", mode="fwd+bwd")
        target = f"fp32 fwd+bwd >= {MIN_SPEEDUP_VS_COMPILE:g}x torch.compile"
        if mm is None or tc is None:
            row(target, None, MIN_SPEEDUP_VS_COMPILE, "x", "fp32 fwd+bwd not measured")
        elif mm["status"] != "ok" or tc["status"] != "ok":
            bad = mm if mm["status"] != "ok" else tc
            row(target, None, MIN_SPEEDUP_VS_COMPILE, "x", f"{bad['provider']} {bad['status']}: {bad['reason']}")
        else:
            row(target, tc["p50_ms"] / mm["p50_ms"], MIN_SPEEDUP_VS_COMPILE, "x",
                detail=f"{mm['p50_ms']:.3f} ms vs {tc['p50_ms']:.3f} ms")

        target = f"fp32 fwd+bwd >= {MIN_FRAC_COPY_BW:.0%} of copy bandwidth"
        if mm is None:
            row(target, None, MIN_FRAC_COPY_BW, "of copy BW", "fp32 fwd+bwd not measured")
        elif mm["status"] != "ok":
            row(target, None, MIN_FRAC_COPY_BW, "of copy BW", f"mmfuse {mm['status']}: {mm['reason']}")
        else:
            row(target, mm["frac_copy_bw"], MIN_FRAC_COPY_BW, "of copy BW",
                detail=f"{mm['gbps']:.1f} of {mm['copy_gbps']:.1f} GB/s")

        for mode in ("fwd", "fwd+bwd"):
            f32 = _find(rs, provider=MMFUSE, dtype="fp32", mode=mode)
            b16 = _find(rs, provider=MMFUSE, dtype="bf16", mode=mode)
            if f32 is None and b16 is None:
                continue
            if not {"fp32", "bf16"} <= {r["dtype"] for r in rs}:
                continue  # the run asked for one dtype: nothing to compare
            target = f"bf16 {mode} >= {MIN_BF16_SPEEDUP:g}x faster than fp32"
            if f32 is None or b16 is None:
                row(target, None, MIN_BF16_SPEEDUP, "x", f"mmfuse {mode} not measured in both dtypes")
            elif f32["status"] != "ok" or b16["status"] != "ok":
                bad = f32 if f32["status"] != "ok" else b16
                row(target, None, MIN_BF16_SPEEDUP, "x", f"mmfuse {bad['dtype']} {bad['status']}: {bad['reason']}")
            else:
                row(target, f32["p50_ms"] / b16["p50_ms"], MIN_BF16_SPEEDUP, "x",
                    detail=f"{b16['p50_ms']:.3f} ms vs {f32['p50_ms']:.3f} ms")
    return rows


def format_value(row: dict) -> str:
    if row["value"] is None:
        return "-"
    return f"{row['value']:.0%}" if row["unit"] == "of copy BW" else f"{row['value']:.2f}x"
