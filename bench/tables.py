"""Result tables, as aligned text for the terminal and as markdown for docs/performance.md.

One table per (op, threads, allocator); a row per dtype x mode x provider: p50 time with the
p20-p80 spread, effective GB/s (minimal bytes / time), percent of the copy bandwidth, and how many
times faster the row is than torch.compile and than the HF eager code (> 1: faster)."""

from __future__ import annotations

from bench.harness import BASELINES, MMFUSE, MODES, ROOFLINE
from bench.targets import format_value

HEADER = ("dtype", "mode", "provider", "ms p50", "p20-p80", "GB/s", "% copy BW", "x vs compile", "x vs eager")
PROVIDER_ORDER = (MMFUSE, *BASELINES, ROOFLINE)


def _order(r: dict) -> tuple:
    dtypes = ("fp32", "bf16")
    return (dtypes.index(r["dtype"]) if r["dtype"] in dtypes else 9, MODES.index(r["mode"]),
            PROVIDER_ORDER.index(r["provider"]) if r["provider"] in PROVIDER_ORDER else 9)


def groups(records: list[dict]) -> list[tuple[tuple, list[dict]]]:
    """[((op, shape, threads, allocator), records)], in first-seen order, records sorted for display."""
    out: dict[tuple, list[dict]] = {}
    for r in records:
        out.setdefault((r["op"], r["shape"], r["threads"], r["allocator"]), []).append(r)
    return [(k, sorted(v, key=_order)) for k, v in out.items()]


def _ratio(other: dict | None, r: dict) -> str:
    if other is None or other["status"] != "ok" or r["p50_ms"] is None:
        return ""
    return f"{other['p50_ms'] / r['p50_ms']:.2f}"


def rows(records: list[dict]) -> list[tuple[str, ...]]:
    """Table cells for the records of one group."""
    by_key = {(r["dtype"], r["mode"], r["provider"]): r for r in records}
    out = []
    for r in records:
        cells = [r["dtype"], r["mode"], r["provider"]]
        if r["status"] in ("skipped", "error"):
            out.append(tuple(cells + [f"{r['status']}: {r['reason']}", "", "", "", "", ""]))
            continue
        spread = "" if r["provider"] == ROOFLINE else f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}"
        cells += [f"{r['p50_ms']:.3f}", spread, f"{r['gbps']:.1f}", f"{100 * r['frac_copy_bw']:.0f}%",
                  _ratio(by_key.get((r["dtype"], r["mode"], "torch_compile")), r),
                  _ratio(by_key.get((r["dtype"], r["mode"], "hf_eager")), r)]
        out.append(tuple(cells))
    return out


def title(key: tuple, records: list[dict]) -> str:
    op, shape, threads, allocator = key
    models = {}
    for r in records:
        models.setdefault(r["mode"], (r["bytes"], r["bytes_model"]))
    bytes_txt = "; ".join(f"{m} {b / 2**20:.1f} MiB ({f})" for m, (b, f) in models.items())
    return f"{op} {shape}, {threads} threads, allocator {allocator} -- bytes: {bytes_txt}"


def text_table(cells: list[tuple[str, ...]], header=HEADER, left: int = 3) -> str:
    """Aligned columns: the first `left` left-aligned, the rest (numbers) right-aligned."""
    widths = [max(len(str(c[i])) for c in [header, *cells]) for i in range(len(header))]
    # A skip/error message spans the numeric columns: do not let it widen them.
    if header is HEADER:
        widths[3] = max([len(header[3])] + [len(c[3]) for c in cells if not c[3].startswith(("skipped", "error"))])
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for c in cells:
        if header is HEADER and c[3].startswith(("skipped", "error")):
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
    return "\n\n".join(f"{title(k, rs)}\n{text_table(rows(rs))}" for k, rs in groups(records))


def format_markdown(records: list[dict]) -> str:
    return "\n\n".join(f"**{title(k, rs)}**\n\n{markdown_table(rows(rs))}" for k, rs in groups(records))


# ---- targets -----------------------------------------------------------------------------------

def targets_text(check_rows: list[dict]) -> str:
    multi = len({(r["threads"], r["allocator"]) for r in check_rows}) > 1
    lines = []
    for r in check_rows:
        where = f" [{r['threads']} thr, {r['allocator']}]" if multi else ""
        why = f" ({r['detail']})" if r["detail"] else (f" ({r['reason']})" if r["reason"] else "")
        if r["threshold"] is None:
            lines.append(f"  {r['status']:<8} {r['op']:<14} {r['target']:<40} {'':>7}{why}{where}")
        else:
            lines.append(f"  {r['status']:<8} {r['op']:<14} {r['target']:<40} "
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
    return f"{r['threshold']:.0%}" if r["unit"] == "of copy BW" else f"{r['threshold']:g}x"
