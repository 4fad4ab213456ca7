"""Result tables, as aligned text for the terminal and as markdown for docs/performance.md.

One table per (op, shape, threads, allocator); a row per dtype x mode x provider: p50 time with the
p20-p80 spread, then
  memory-bound ops   effective GB/s (minimal bytes / time), percent of the copy bandwidth, and how
                     many times faster the row is than torch.compile and than the HF eager code
  compute-bound ops  GFLOP/s (model FLOPs / time), percent of the fp32 GEMM rate, and how many
                     times faster mmfuse is than the row's provider
(> 1: faster). Peak-memory records get a table of their own."""

from __future__ import annotations

from bench.harness import BASELINES, MMFUSE, MODES, ROOFLINE
from bench.targets import format_value

HEADER = ("dtype", "mode", "provider", "ms p50", "p20-p80", "GB/s", "% copy BW", "x vs compile", "x vs eager")
FLOP_HEADER = ("dtype", "mode", "provider", "ms p50", "p20-p80", "GFLOP/s", "% GEMM", "mmfuse x faster")
MEMORY_HEADER = ("dtype", "mode", "provider", "peak extra MiB", "gradients MiB", "rest MiB", "x baseline",
                 "step s")
PROVIDER_ORDER = (MMFUSE, *BASELINES, ROOFLINE)


def sort_key(r: dict) -> tuple:
    """Display order: fp32 before bf16, fwd before fwd+bwd, mmfuse first and the roofline last."""
    dtypes = ("fp32", "bf16")
    # Providers named by one op only (sdpa_padded, ...) keep their order, between the common
    # baselines and the roofline.
    rank = (PROVIDER_ORDER.index(r["provider"]) if r["provider"] in PROVIDER_ORDER[:-1] else
            99 if r["provider"] == ROOFLINE else len(PROVIDER_ORDER))
    return (dtypes.index(r["dtype"]) if r["dtype"] in dtypes else 9, MODES.index(r["mode"]), rank)


def is_compute_bound(records: list[dict]) -> bool:
    """Whether a group's records are held to the GEMM rate (older result files: never)."""
    return any(r.get("bound") == "compute" for r in records)


def groups(records: list[dict]) -> list[tuple[tuple, list[dict]]]:
    """[((op, shape, threads, allocator), records)], in first-seen order, records sorted for display."""
    out: dict[tuple, list[dict]] = {}
    for r in records:
        out.setdefault((r["op"], r["shape"], r["threads"], r["allocator"]), []).append(r)
    return [(k, sorted(v, key=sort_key)) for k, v in out.items()]


def _ratio(other: dict | None, r: dict) -> str:
    if other is None or other["status"] != "ok" or r["p50_ms"] is None:
        return ""
    return f"{other['p50_ms'] / r['p50_ms']:.2f}"


def rows(records: list[dict]) -> list[tuple[str, ...]]:
    """Table cells for the records of one group (columns as `header(records)`)."""
    by_key = {(r["dtype"], r["mode"], r["provider"]): r for r in records}
    compute = is_compute_bound(records)
    out = []
    for r in records:
        cells = [r["dtype"], r["mode"], r["provider"]]
        if r["status"] in ("skipped", "error"):
            out.append(tuple(cells + [f"{r['status']}: {r['reason']}"] + [""] * (len(header(records)) - 4)))
            continue
        spread = "" if r["provider"] == ROOFLINE else f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}"
        cells += [f"{r['p50_ms']:.3f}", spread]
        if compute:
            mm = by_key.get((r["dtype"], r["mode"], MMFUSE))
            cells += [f"{r['gflops']:.1f}", f"{100 * r['frac_gemm']:.0f}%", _ratio(r, mm) if mm else ""]
        else:
            cells += [f"{r['gbps']:.1f}", f"{100 * r['frac_copy_bw']:.0f}%",
                      _ratio(by_key.get((r["dtype"], r["mode"], "torch_compile")), r),
                      _ratio(by_key.get((r["dtype"], r["mode"], "hf_eager")), r)]
        out.append(tuple(cells))
    return out


def header(records: list[dict]) -> tuple[str, ...]:
    return FLOP_HEADER if is_compute_bound(records) else HEADER


def title(key: tuple, records: list[dict]) -> str:
    op, shape, threads, allocator = key
    if is_compute_bound(records):
        models = {}
        for r in records:
            models.setdefault(r["mode"], (r["flops"], r["flops_model"]))
        gemm = next((r["gemm_gflops"] for r in records if r.get("gemm_gflops")), None)
        flops_txt = "; ".join(f"{m} {f / 1e9:.2f} GFLOP ({formula})" for m, (f, formula) in models.items())
        return (f"{op} {shape}, {threads} threads, allocator {allocator} -- FLOPs: {flops_txt}; "
                f"fp32 GEMM {gemm:.0f} GFLOP/s")
    models = {}
    for r in records:
        models.setdefault(r["mode"], (r["bytes"], r["bytes_model"]))
    bytes_txt = "; ".join(f"{m} {b / 2**20:.1f} MiB ({f})" for m, (b, f) in models.items())
    return f"{op} {shape}, {threads} threads, allocator {allocator} -- bytes: {bytes_txt}"


def text_table(cells: list[tuple[str, ...]], header=HEADER, left: int = 3) -> str:
    """Aligned columns: the first `left` left-aligned, the rest (numbers) right-aligned."""
    widths = [max(len(str(c[i])) for c in [header, *cells]) for i in range(len(header))]
    # A skip/error message spans the numeric columns: do not let it widen them.
    spans = header in (HEADER, FLOP_HEADER, MEMORY_HEADER)
    if spans:
        widths[3] = max([len(header[3])] + [len(c[3]) for c in cells if not c[3].startswith(("skipped", "error"))])
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for c in cells:
        if spans and c[3].startswith(("skipped", "error")):
            lines.append("  ".join(x.ljust(w) for x, w in zip(c[:3], widths[:3])) + "  " + c[3])
        else:
            lines.append("  ".join(x.rjust(w) if i >= left else x.ljust(w) for i, (x, w) in enumerate(zip(c, widths))))
    return "\n".join(lines)


def markdown_table(cells: list[tuple[str, ...]], header=HEADER) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|"]
    for c in cells:
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in c) + " |")
    return "\n".join(lines)


def format_text(records: list[dict]) -> str:
    return "\n\n".join(f"{title(k, rs)}\n{text_table(rows(rs), header(rs))}" for k, rs in groups(records))


def format_markdown(records: list[dict]) -> str:
    return "\n\n".join(f"**{title(k, rs)}**\n\n{markdown_table(rows(rs), header(rs))}"
                       for k, rs in groups(records))


# ---- peak memory -------------------------------------------------------------------------------

def memory_groups(memory: list[dict]) -> list[tuple[tuple, list[dict]]]:
    """[((op, shape, threads), records)], in first-seen order, mmfuse first."""
    out: dict[tuple, list[dict]] = {}
    for r in memory:
        out.setdefault((r["op"], r["shape"], r["threads"]), []).append(r)
    return [(k, sorted(v, key=lambda r: (r["dtype"] != "fp32", r["provider"] != MMFUSE))) for k, v in out.items()]


def memory_rows(memory: list[dict]) -> list[tuple[str, ...]]:
    out = []
    for r in memory:
        cells = [r["dtype"], r["mode"], r["provider"]]
        if r["status"] != "ok":
            out.append(tuple(cells + [f"{r['status']}: {r['reason']}", "", "", "", ""]))
            continue
        vs = r.get("extra_vs") or {}
        out.append(tuple(cells + [f"{r['extra_bytes'] / 2**20:.0f}", f"{r['grad_bytes'] / 2**20:.0f}",
                                  f"{(r['extra_bytes'] - r['grad_bytes']) / 2**20:.0f}",
                                  ", ".join(f"{v:.3f} of {k}" for k, v in vs.items()), f"{r['seconds']:.2f}"]))
    return out


def memory_title(key: tuple) -> str:
    op, shape, threads = key
    return f"{op} {shape}, {threads} threads -- peak memory of one fwd+bwd"


def memory_method(memory: list[dict]) -> str:
    """How the numbers of a memory table were taken, for the line under its title."""
    how = next((r["method"] for r in memory if r.get("method")), "not measured")
    return ("Each provider in a fresh process: inputs built, a small warm-up step, then one fwd+bwd with output "
            f"gradients of ones; peak extra = {how}. 'gradients' are the input gradients the step returns, "
            "'rest' everything else (logits, buffers, autograd state).")


def memory_text(memory: list[dict]) -> str:
    return "\n\n".join(f"{memory_title(k)}\n{memory_method(rs)}\n{text_table(memory_rows(rs), MEMORY_HEADER)}"
                       for k, rs in memory_groups(memory))


# ---- targets -----------------------------------------------------------------------------------

def targets_text(check_rows: list[dict]) -> str:
    multi = len({(r["threads"], r["allocator"]) for r in check_rows}) > 1
    width = max([40] + [len(r["target"]) for r in check_rows])
    lines = []
    for r in check_rows:
        where = f" [{r['threads']} thr, {r['allocator']}]" if multi else ""
        why = f" ({r['detail']})" if r["detail"] else (f" ({r['reason']})" if r["reason"] else "")
        if r["threshold"] is None:
            lines.append(f"  {r['status']:<8} {r['op']:<14} {r['target']:<{width}} {'':>7}{why}{where}")
        else:
            lines.append(f"  {r['status']:<8} {r['op']:<14} {r['target']:<{width}} "
                         f"{format_value(r):>7} (need {_need(r)}){why}{where}")
    return "\n".join(lines)


def targets_markdown(check_rows: list[dict]) -> str:
    lines = ["| op | threads | allocator | target | value | status | detail |", "|---|---:|---|---|---:|---|---|"]
    for r in check_rows:
        lines.append(f"| {r['op']} | {r['threads']} | {r['allocator']} | {r['target']} | "
                     f"{format_value(r) if r['threshold'] is not None else ''} | "
                     f"{r['status']} | {r['detail'] or r['reason'] or ''} |")
    return "\n".join(lines)


def _need(r: dict) -> str:
    if r["threshold"] is None:
        return "-"
    cmp = "<= " if r.get("cmp") == "<=" else ""
    return f"{r['threshold']:.0%}" if r["unit"] == "of copy BW" else f"{cmp}{r['threshold']:g}x"
