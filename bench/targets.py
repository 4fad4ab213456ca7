"""The CPU targets the ops are checked against (see DESIGN.md, Benchmarks):

  memory-bound ops
  1. fp32 fwd+bwd at least 2x faster than torch.compile of the Hugging Face code
  2. fp32 fwd+bwd at least 50% of the copy bandwidth measured in the same run
  every op
  3. bf16 at least 1.5x faster than fp32 on the same shape (each mode)
  compute-bound ops (attention, the LM head): their own targets against named baselines, from the
  CPU attention / cross-entropy issue (SPEEDUP_TARGETS, MEMORY_TARGETS)

Checked on mmfuse's records; a target whose inputs are missing (op skipped, provider failed) is
reported as n/a with the reason, never as met.
"""

from __future__ import annotations

from bench.harness import MMFUSE, MODES

MIN_SPEEDUP_VS_COMPILE = 2.0
MIN_FRAC_COPY_BW = 0.5
MIN_BF16_SPEEDUP = 1.5

# op -> ((baseline provider, modes, comparison, threshold), ...), checked in fp32.
#   ">=": mmfuse at least `threshold` times faster than the baseline (baseline ms / mmfuse ms)
#   "<=": mmfuse's time at most `threshold` times the baseline's (mmfuse ms / baseline ms)
SPEEDUP_TARGETS = {
    "attention_varlen": (("sdpa_padded", MODES, ">=", 3.0), ("sdpa_loop", MODES, ">=", 1.2)),
    "attention_windows": (("hf_window_loop", MODES, ">=", 5.0),),
    # mmfuse's forward computes the gradients too, so only fwd+bwd compares like with like.
    "linear_cross_entropy": (("hf_eager", ("fwd+bwd",), "<=", 1.1),),
}
# op -> (baseline provider, most mmfuse's fp32 fwd+bwd peak extra memory may be, as a fraction of the
# baseline's).
MEMORY_TARGETS = {"linear_cross_entropy": ("hf_eager", 0.25)}


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


def _not_ok(*recs) -> str | None:
    """Why a comparison of these records cannot be made, or None."""
    bad = next((r for r in recs if r["status"] != "ok"), None)
    return None if bad is None else f"{bad['provider']} {bad['status']}: {bad['reason']}"


def check(records: list[dict], memory: list[dict] | None = None) -> list[dict]:
    """One row per (op, threads, allocator, target): value, threshold, status met / NOT met / n/a.
    `memory` holds the peak-memory records (`harness.peak_memory_records`), where measured."""
    rows = []
    for op, threads, allocator in _setting_keys(records):
        rs = [r for r in records if r["op"] == op and r["threads"] == threads and r["allocator"] == allocator]
        base = {"op": op, "threads": threads, "allocator": allocator}
        mine = [r for r in rs if r["provider"] == MMFUSE]
        if mine and all(r["status"] == "skipped" for r in mine):
            rows.append({**base, "target": "all targets", "value": None, "threshold": None, "unit": "",
                         "cmp": ">=", "status": "n/a", "reason": f"skipped: {mine[0]['reason']}", "detail": ""})
            continue

        def row(target, value, threshold, unit, reason=None, detail="", cmp=">="):
            met = value is not None and (value >= threshold if cmp == ">=" else value <= threshold)
            status = "n/a" if value is None else ("met" if met else "NOT met")
            rows.append({**base, "target": target, "value": value, "threshold": threshold, "unit": unit, "cmp": cmp,
                         "status": status, "reason": reason, "detail": detail})

        # Records written before compute-bound cases existed have no `bound`: all memory-bound.
        if any(r.get("bound") == "compute" for r in rs):
            _compute_targets(op, rs, row)
            if allocator == "default":  # peak memory is measured under the default allocator only
                _memory_target(op, [m for m in memory or () if m["op"] == op and m["threads"] == threads], row)
        else:
            _memory_bound_targets(rs, row)
        _bf16_targets(rs, row)
    return rows


def _compute_targets(op: str, rs: list[dict], row) -> None:
    for provider, modes, cmp, threshold in SPEEDUP_TARGETS.get(op, ()):
        for mode in modes:
            mm = _find(rs, provider=MMFUSE, dtype="fp32", mode=mode)
            other = _find(rs, provider=provider, dtype="fp32", mode=mode)
            if cmp == ">=":
                target = f"fp32 {mode} >= {threshold:g}x faster than {provider}"
            else:
                target = f"fp32 {mode} time <= {threshold:g}x {provider}'s"
            if mm is None or other is None:
                row(target, None, threshold, "x", f"fp32 {mode} mmfuse or {provider} not measured", cmp=cmp)
            elif _not_ok(mm, other):
                row(target, None, threshold, "x", _not_ok(mm, other), cmp=cmp)
            else:
                value = other["p50_ms"] / mm["p50_ms"] if cmp == ">=" else mm["p50_ms"] / other["p50_ms"]
                row(target, value, threshold, "x", detail=f"{mm['p50_ms']:.3f} ms vs {other['p50_ms']:.3f} ms",
                    cmp=cmp)


def _memory_target(op: str, ms: list[dict], row) -> None:
    if op not in MEMORY_TARGETS:
        return
    provider, threshold = MEMORY_TARGETS[op]
    target = f"fp32 fwd+bwd peak extra memory <= {threshold:g}x {provider}'s"
    mm = _find(ms, provider=MMFUSE, dtype="fp32")
    other = _find(ms, provider=provider, dtype="fp32")
    if mm is None or other is None:
        row(target, None, threshold, "x", f"peak memory of mmfuse or {provider} not measured", cmp="<=")
    elif _not_ok(mm, other):
        row(target, None, threshold, "x", _not_ok(mm, other), cmp="<=")
    else:
        row(target, mm["extra_bytes"] / other["extra_bytes"], threshold, "x", cmp="<=",
            detail=f"{mm['extra_bytes'] / 2**20:.0f} MiB vs {other['extra_bytes'] / 2**20:.0f} MiB")


def _memory_bound_targets(rs: list[dict], row) -> None:
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


def _bf16_targets(rs: list[dict], row) -> None:
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


def format_value(row: dict) -> str:
    if row["value"] is None:
        return "-"
    return f"{row['value']:.0%}" if row["unit"] == "of copy BW" else f"{row['value']:.2f}x"
