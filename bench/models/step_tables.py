"""Summary, targets and tables of a Qwen2.5-VL step benchmark result (bench_qwen2_5_vl_step.py).

Targets (CPU, fp32, the issue's): mmfuse's step at least 2x faster than the faster of the two
transformers runs, and its peak memory at most 0.6x that run's. Ratios: time = baseline / mmfuse
(how many times faster mmfuse is); memory = mmfuse / baseline (the fraction of the baseline's).
"""

from __future__ import annotations

from bench.tables import text_table

SCHEMA = "mmfuse-bench-qwen2_5_vl-step/1"
MMFUSE, HF_PER_SAMPLE, HF_PADDED = "mmfuse", "hf_per_sample", "hf_padded"
# mmfuse with full recompute of every ViT block and decoder layer: what a memory-bound user runs.
MMFUSE_RECOMPUTE = "mmfuse_recompute"
HF_MODES = (HF_PER_SAMPLE, HF_PADDED)
FWD_BWD, WITH_ADAMW = "fwd+bwd", "fwd+bwd+adamw"
MODES = (FWD_BWD, WITH_ADAMW)
MIN_SPEEDUP = 2.0
MAX_MEMORY_RATIO = 0.6
MIB = 2**20


def baseline_of(records: list[dict], mode: str) -> str:
    """The transformers run with the lowest median step time in `mode`."""
    hf = [r for r in records if r["mode"] == mode and r["provider"] in HF_MODES]
    return min(hf, key=lambda r: r["p50_ms"])["provider"]


def _memory(result: dict, provider: str) -> dict | None:
    for m in result.get("memory") or []:
        if m["provider"] == provider and "error" not in m:
            return m
    return None


def summarise(payload: dict) -> dict:
    """{size: {mode: baseline, times, speed-up, memory and memory ratios}}."""
    out = {}
    for size, res in payload["sizes"].items():
        per_mode = {}
        for mode in MODES:
            recs = {r["provider"]: r for r in res["records"] if r["mode"] == mode}
            base = baseline_of(res["records"], mode)
            s = {"baseline": base, "mmfuse_ms": recs[MMFUSE]["p50_ms"], "baseline_ms": recs[base]["p50_ms"],
                 "speedup": recs[base]["p50_ms"] / recs[MMFUSE]["p50_ms"]}
            mine, theirs = _memory(res, MMFUSE), _memory(res, base)
            hf_all = [m for m in (_memory(res, p) for p in HF_MODES) if m is not None]
            key = f"peak_rss_growth_{mode}"
            if mine and theirs and theirs[key] > 0 and theirs[f"live_tensor_peak_{mode}"] > 0:
                live = f"live_tensor_peak_{mode}"
                lowest = min(hf_all, key=lambda m: m[key])
                s.update(mmfuse_peak_bytes=mine[key], baseline_peak_bytes=theirs[key],
                         memory_ratio=mine[key] / theirs[key],
                         lowest_hf=lowest["provider"], memory_ratio_vs_lowest_hf=mine[key] / lowest[key],
                         mmfuse_live_bytes=mine[live], baseline_live_bytes=theirs[live],
                         live_ratio=mine[live] / theirs[live])
            rc, rc_mem = recs.get(MMFUSE_RECOMPUTE), _memory(res, MMFUSE_RECOMPUTE)
            if rc:
                s["recompute_speedup"] = recs[base]["p50_ms"] / rc["p50_ms"]
            if rc_mem and theirs and theirs[key] > 0:
                s["recompute_memory_ratio"] = rc_mem[key] / theirs[key]
            prof = (res.get("profile") or {}).get(MMFUSE)
            if prof and mode == FWD_BWD:
                # If everything but mmfuse's GEMMs took no time, the step could be at most this much faster.
                s["speedup_bound_gemm_only"] = s["baseline_ms"] / (s["mmfuse_ms"] * prof["gemm_fraction"])
            per_mode[mode] = s
        out[size] = per_mode
    return out


def targets(payload: dict) -> list[dict]:
    rows = []
    for size, per_mode in payload["summary"].items():
        for mode, s in per_mode.items():
            rows.append({"size": size, "target": f"{mode} >= {MIN_SPEEDUP:g}x faster", "value": s["speedup"],
                         "threshold": MIN_SPEEDUP,
                         "status": "met" if s["speedup"] >= MIN_SPEEDUP else "NOT met",
                         "detail": f"{s['baseline']} {s['baseline_ms']:.1f} ms / mmfuse {s['mmfuse_ms']:.1f} ms"})
            ratio = s.get("memory_ratio")
            rows.append({"size": size, "target": f"{mode} peak memory <= {MAX_MEMORY_RATIO:g}x", "value": ratio,
                         "threshold": MAX_MEMORY_RATIO,
                         "status": "n/a" if ratio is None else ("met" if ratio <= MAX_MEMORY_RATIO else "NOT met"),
                         "detail": "memory not measured" if ratio is None else
                         f"peak RSS growth mmfuse {s['mmfuse_peak_bytes'] / MIB:.0f} MiB / {s['baseline']} "
                         f"{s['baseline_peak_bytes'] / MIB:.0f} MiB"})
            rc = s.get("recompute_memory_ratio")
            if rc is not None:
                rows.append({"size": size, "target": f"{mode} peak memory <= {MAX_MEMORY_RATIO:g}x (full recompute)",
                             "value": rc, "threshold": MAX_MEMORY_RATIO,
                             "status": "met" if rc <= MAX_MEMORY_RATIO else "NOT met",
                             "detail": f"mmfuse_recompute, {s.get('recompute_speedup', float('nan')):.2f}x "
                                       f"the baseline's speed"})
    return rows


# ---- tables --------------------------------------------------------------------------------------

TIME_HEADER = ("provider", "mode", "role", "p50 ms", "p20-p80 ms", "reps", "tokens/s", "GFLOP/s", "% sgemm",
               "mmfuse faster by")
MEM_HEADER = ("provider", "peak RSS growth fwd+bwd MiB", "+AdamW MiB", "live tensors fwd+bwd MiB",
              "+AdamW MiB", "vs baseline (RSS fwd+bwd / +AdamW)")
TARGET_HEADER = ("size", "target", "status", "value", "detail")


def _markdown(cells: list[tuple[str, ...]], header: tuple[str, ...], left: int,
              text_cols: tuple[int, ...] = ()) -> str:
    """A markdown table: the first `left` columns and `text_cols` left-aligned, the rest (numbers) right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < left or i in text_cols else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    return "\n".join(lines)


def _time_rows(payload: dict, size: str) -> list[tuple[str, ...]]:
    res, summ = payload["sizes"][size], payload["summary"][size]
    sgemm = payload["environments"][0].get("sgemm_gflops") or float("nan")
    rows = []
    for mode in MODES:
        mine = next(r for r in res["records"] if r["mode"] == mode and r["provider"] == MMFUSE)
        for r in (x for x in res["records"] if x["mode"] == mode):
            role = "mmfuse" if r["provider"] in (MMFUSE, MMFUSE_RECOMPUTE) else \
                "baseline" if r["provider"] == summ[mode]["baseline"] else "other HF run"
            rows.append((r["provider"], mode, role, f"{r['p50_ms']:.1f}", f"{r['p20_ms']:.1f}-{r['p80_ms']:.1f}",
                         str(r["reps"]), f"{r['tokens_per_s']:.0f}", f"{r['gflops']:.1f}",
                         f"{100 * r['gflops'] / sgemm:.0f}%", f"{r['p50_ms'] / mine['p50_ms']:.2f}x"))
    return rows


def _mem_rows(payload: dict, size: str) -> list[tuple[str, ...]]:
    res = payload["sizes"][size]
    mine = _memory(res, MMFUSE)
    rows = []
    for m in res.get("memory") or []:
        if "error" in m:
            rows.append((m["provider"], f"error: {m['error']}", "", "", "", ""))
            continue
        ratio = "-" if m["provider"] in (MMFUSE, MMFUSE_RECOMPUTE) or not mine else \
            (f"{mine['peak_rss_growth_fwd+bwd'] / m['peak_rss_growth_fwd+bwd']:.2f}x / "
             f"{mine['peak_rss_growth_fwd+bwd+adamw'] / m['peak_rss_growth_fwd+bwd+adamw']:.2f}x")
        rows.append((m["provider"], f"{m['peak_rss_growth_fwd+bwd'] / MIB:.0f}",
                     f"{m['peak_rss_growth_fwd+bwd+adamw'] / MIB:.0f}", f"{m['live_tensor_peak_fwd+bwd'] / MIB:.0f}",
                     f"{m['live_tensor_peak_fwd+bwd+adamw'] / MIB:.0f}", ratio))
    return rows


def _target_rows(payload: dict) -> list[tuple[str, ...]]:
    return [(r["size"], r["target"], r["status"], "-" if r["value"] is None else f"{r['value']:.2f}x", r["detail"])
            for r in payload["targets"]]


def _profile_rows(prof: dict) -> list[tuple[str, ...]]:
    return [(r["op"][:60], str(r["calls"]), f"{r['self_ms']:.1f}", f"{r['self_pct']:.1f}%", f"{r['total_ms']:.1f}")
            for r in prof["top"]]


PROFILE_HEADER = ("op", "calls", "self ms", "self %", "total ms")


def _size_line(payload: dict, size: str) -> str:
    res = payload["sizes"][size]
    p, i = res["params"], res["inputs"]
    return (f"{size}: {p['total'] / 1e6:.1f}M parameters (vision {p['vision'] / 1e6:.1f}M, text layers "
            f"{p['text_layers'] / 1e6:.1f}M, embedding {p['text_embedding'] / 1e6:.1f}M"
            f"{', tied to the LM head' if p['lm_head_tied'] else ''}); {i['samples']} samples of "
            f"{' + '.join(map(str, i['sample_tokens']))} = {i['tokens']} tokens ({i['label_tokens']} label tokens), "
            f"images {', '.join(i['images'])} (grid_thw {i['image_grid_thw']}, pixel_values {i['pixel_values']}); "
            f"padded batch {i['padded_batch']} ({100 * i['padding_fraction']:.1f}% padding); "
            f"{res['flops_per_step'] / 1e9:.2f} GFLOP per step; loss {res['losses']['mmfuse']:.6f}")


PROFILE_NOTE = ("`GeneratedBackwardFor_mmfuse_<op>_default` is the autograd wrapper of the custom op in the forward: "
                "its self time is mmfuse's forward C++ kernel; `mmfuse::<op>_backward` is the backward kernel.")


def _profile_caption(payload: dict, size: str, prov: str, prof: dict) -> str:
    text = (f"Top ops of one {prov} fwd+bwd step by self CPU time (torch.profiler, {prof['wall_ms']:.0f} ms wall); "
            f"GEMMs (mm/addmm) {prof['gemm_self_ms']:.0f} ms = {100 * prof['gemm_fraction']:.0f}% of self time")
    bound = payload["summary"][size][FWD_BWD].get("speedup_bound_gemm_only")
    if prov == MMFUSE and bound:
        text += f"; were the rest free, mmfuse would be at most {bound:.2f}x faster than the baseline"
    return text + "."


def format_text(payload: dict) -> str:
    parts = []
    for size in payload["sizes"]:
        parts += [_size_line(payload, size), "", text_table(_time_rows(payload, size), TIME_HEADER, left=3), ""]
        if payload["sizes"][size].get("memory"):
            parts += [text_table(_mem_rows(payload, size), MEM_HEADER, left=1), ""]
        for prov, prof in (payload["sizes"][size].get("profile") or {}).items():
            parts += [f"{size}: {_profile_caption(payload, size, prov, prof)}",
                      text_table(_profile_rows(prof), PROFILE_HEADER, left=1), ""]
    parts += ["targets (mmfuse):", text_table(_target_rows(payload), TARGET_HEADER, left=3)]
    return "\n".join(parts)


METHOD = """Method: one training step, fp32, of mmfuse's `Qwen2_5_VL` (samples packed into one
stream) against transformers' `Qwen2_5_VLForConditionalGeneration` with
`attn_implementation="sdpa"`, on the same weights (transformers' initialisation, saved once and
loaded by every provider) and the same samples. transformers runs them one sample at a time
(`hf_per_sample`, each loss divided by the batch's label-token count) and as one right-padded batch
with `attention_mask` (`hf_padded`), both with `mm_token_type_ids`; the faster is the baseline. All
compute the same mean loss (checked to rtol 1e-4). Times: median of round-robin reps after warmup;
`fwd+bwd` sets gradients to None before each rep (untimed), `fwd+bwd+adamw` adds
`AdamW(fused=True).step()` and `zero_grad(set_to_none=True)`. FLOPs:
`mmfuse.train.metrics.step_flops` (6·N per token per module plus attention), the same count
credited to every provider; `% sgemm` against the fp32 GEMM rate (n×n×n, n below) of the same run.
Memory: each provider in a fresh process; peak RSS growth = VmHWM (reset with
`/proc/self/clear_refs` after model and inputs are built) minus the RSS then, over 2 steps; live
tensors = peak of the CPU allocator's live bytes above the step's start (torch.profiler
`profile_memory`), which leaves out parameters and optimizer state allocated before the step."""


def render_markdown(payload: dict) -> str:
    """The docs/performance.md block for one result (report.py puts it between its step markers)."""
    from bench.report import _env_lines

    s = payload["settings"]
    parts = [f"Command: `{payload['command']}`", ""]
    if s.get("quick"):
        parts += ["**Quick run (small inputs, few reps): a smoke test of the benchmark, not a measurement.**", ""]
    parts += _env_lines(payload)
    env = payload["environments"][0]
    load = (env.get("load_average") or [0.0])[0]
    if load >= 1.0:
        # Other processes shared the cores: the times of this run are indicative, the memory is not affected.
        parts += [f"- **Loaded machine:** load average {load:.1f} on {env.get('usable_cpus')} CPUs when the run "
                  "started; times are indicative only (peak memory does not depend on it)"]
    parts += [f"- **transformers** {env.get('transformers')}; **timing:** {s['warmup']} warmup, up to {s['reps']} "
              f"reps per provider (at most {s['max_time_s']} s each); GEMM n = {env.get('sgemm_n')}; seed {s['seed']}",
              "", METHOD, "", "#### Targets", "",
              _markdown(_target_rows(payload), TARGET_HEADER, 3, (4,)), ""]
    for size in payload["sizes"]:
        parts += [f"#### {size}", "", _size_line(payload, size), "",
                  _markdown(_time_rows(payload, size), TIME_HEADER, 3), ""]
        if payload["sizes"][size].get("memory"):
            parts += [_markdown(_mem_rows(payload, size), MEM_HEADER, 1), ""]
        for prov, prof in (payload["sizes"][size].get("profile") or {}).items():
            parts += [_profile_caption(payload, size, prov, prof), "", _markdown(_profile_rows(prof), PROFILE_HEADER, 1),
                      ""]
        if payload["sizes"][size].get("profile"):
            parts += [PROFILE_NOTE, ""]
    return "\n".join(parts).rstrip() + "\n"
