"""Bar charts from a results JSON: one PNG per op, a panel per dtype x mode, providers side by
side (one bar per thread/allocator setting when the file holds several), the roofline drawn as a
dashed reference line. Saved as docs/img/bench_<op>.png. Compute-bound ops are drawn in GFLOP/s
against the GEMM rate where the others use GB/s against the copy bandwidth.

  python bench/plot.py bench/results/cpu-20261127-abc1234.json [--metric gbps|ms] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root, not bench/

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.common import REPO_ROOT, read_json  # noqa: E402
from bench.harness import MODES, ROOFLINE  # noqa: E402
from bench.tables import is_compute_bound, sort_key  # noqa: E402

DEFAULT_OUT_DIR = REPO_ROOT / "docs" / "img"


def _settings(records: list[dict]) -> list[tuple]:
    seen = []
    for r in records:
        key = (r["threads"], r["allocator"])
        if key not in seen:
            seen.append(key)
    return seen


def plot_op(op: str, records: list[dict], env: dict, metric: str, out_dir: Path) -> Path:
    """One figure for `op`; returns the PNG path."""
    rs = [r for r in records if r["op"] == op]
    dtypes = [d for d in ("fp32", "bf16") if any(r["dtype"] == d for r in rs)]
    modes = [m for m in MODES if any(r["mode"] == m for r in rs)]
    providers = list(dict.fromkeys(r["provider"] for r in sorted(rs, key=sort_key) if r["provider"] != ROOFLINE))
    settings = _settings(rs)
    compute = is_compute_bound(rs)
    rate, rate_label, roof_label = (("gflops", "GFLOP/s", "GEMM rate") if compute else
                                    ("gbps", "effective GB/s", "copy BW"))
    fig, axes = plt.subplots(len(dtypes), len(modes), figsize=(4.2 * len(modes), 3.2 * len(dtypes)),
                             squeeze=False)
    width = 0.8 / len(settings)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, dtype in enumerate(dtypes):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            cell = [r for r in rs if r["dtype"] == dtype and r["mode"] == mode]
            for k, (threads, allocator) in enumerate(settings):
                xs, ys, missing = [], [], []
                for x, p in enumerate(providers):
                    r = next((r for r in cell if r["provider"] == p and r["threads"] == threads
                              and r["allocator"] == allocator), None)
                    pos = x - 0.4 + width * (k + 0.5)
                    if r is None or r["status"] != "ok":
                        missing.append((pos, "skipped" if r is None or r["status"] == "skipped" else "error"))
                        continue
                    xs.append(pos)
                    ys.append(r[rate] if metric == "gbps" else r["p50_ms"])
                label = f"{threads} thr, {allocator} alloc" if len(settings) > 1 else None
                ax.bar(xs, ys, width, color=colors[k % len(colors)], label=label)
                for pos, why in missing:  # x in data units, y in axes units: just above the axis
                    ax.text(pos, 0.03, why, rotation=90, ha="center", va="bottom", fontsize=8, color="0.4",
                            transform=ax.get_xaxis_transform())
                roof = next((r for r in cell if r["provider"] == ROOFLINE and r["threads"] == threads
                             and r["allocator"] == allocator), None)
                if roof is not None:
                    y = roof[rate] if metric == "gbps" else roof["p50_ms"]
                    ax.axhline(y, color=colors[k % len(colors)], linestyle="--", linewidth=1,
                               label=f"roofline ({roof_label}){'' if len(settings) == 1 else f', {threads} thr'}")
            ax.set_xlim(-0.6, len(providers) - 0.4)
            ax.set_ylim(0, ax.get_ylim()[1] * 1.15)  # room for the legend above the roofline
            ax.set_xticks(range(len(providers)))
            ax.set_xticklabels(providers, rotation=20, ha="right", fontsize=8)
            ax.set_title(f"{dtype} {mode}", fontsize=9)
            ax.set_ylabel(f"{rate_label} (higher is better)" if metric == "gbps" else "ms, p50 (lower is better)",
                          fontsize=8)
            ax.legend(fontsize=7, loc="upper right")
    shape = rs[0]["shape"] if rs else ""
    commit = f"{env.get('git_commit')}{'+dirty' if env.get('git_dirty') else ''}"
    fig.suptitle(f"{op} {shape} -- {env.get('cpu_model', '?')}, torch {env.get('torch', '?')}, "
                 f"commit {commit}, {env.get('date_utc', '')[:10]}", fontsize=9)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench_{op}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_results(results: dict, metric: str = "gbps", out_dir: Path = DEFAULT_OUT_DIR) -> list[Path]:
    records = results["records"]
    env = results["environments"][0] if results.get("environments") else {}
    ops = list(dict.fromkeys(r["op"] for r in records))
    return [plot_op(op, records, env, metric, out_dir) for op in ops]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/plot.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, help="a results JSON written by bench/run_all.py")
    p.add_argument("--metric", choices=("gbps", "ms"), default="gbps",
                   help="bar height: the rate (effective GB/s = minimal bytes / time; GFLOP/s for compute-bound "
                        "ops) or p50 milliseconds (default: gbps)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help=f"default: {DEFAULT_OUT_DIR}")
    args = p.parse_args(argv)
    for path in plot_results(read_json(args.results), args.metric, args.out_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
