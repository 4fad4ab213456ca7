"""Write a results JSON into docs/performance.md as markdown: machine, versions, commit, date, the
exact command, the targets check and one table per op. Only the text between the
`<!-- bench:begin -->` and `<!-- bench:end -->` markers is replaced; the file (with its
methodology section) is created when missing. A training-step result of
bench/models/bench_qwen2_5_vl_step.py goes between `<!-- bench-step:begin -->` and
`<!-- bench-step:end -->` instead (appended to the file when those markers are missing).

  python bench/report.py bench/results/cpu-20261127-abc1234.json [--doc docs/performance.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root, not bench/

from bench import tables, targets  # noqa: E402
from bench.common import REPO_ROOT, read_json  # noqa: E402
from bench.models import step_tables  # noqa: E402

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"
# Model training-step results (bench/models/) have a block of their own, so writing them never
# replaces the op tables, and writing op tables never replaces them.
STEP_BEGIN = "<!-- bench-step:begin -->"
STEP_END = "<!-- bench-step:end -->"
STEP_HEADING = "### Qwen2.5-VL training step"
DEFAULT_DOC = REPO_ROOT / "docs" / "performance.md"

INTRO = f"""# Performance

How fast mmfuse's fused ops are against the code they replace, measured side by side in one run
on one machine. Figures are ratios to baselines measured in the same process, never bare times
from different runs.

## Method

- **Providers.** `mmfuse` (the `mmfuse.ops` custom op); `hf_eager` (the Hugging Face eager code:
  Qwen2RMSNorm's fp32 upcast, rotate_half + cat with cos/sin `[T, D] = cat(freqs, freqs)`,
  `apply_multimodal_rotary_pos_emb`'s per-layer section split of cos/sin `[3, T, D]`,
  `F.silu(gate) * up`); `torch_fused` where PyTorch has a fused op (`F.rms_norm`); `torch_compile`
  (`torch.compile` of the hf_eager function, compiled once before timing); `roofline`.
- **Modes.** `fwd` is the forward of a training step (inputs require grad); `fwd+bwd` adds the
  backward of every output with fixed random output gradients. Input gradients are set to None
  before each rep, outside the timed region, so each backward allocates them as a step after
  `zero_grad(set_to_none=True)` does.
- **Timing.** Wall clock (`time.perf_counter`) around each call, after warmup calls; median (p50)
  with the 20th and 80th percentiles, as Liger-Kernel and `triton.testing.do_bench` report. The
  garbage collector is paused while timing. Threads: `torch.set_num_threads`, which mmfuse's
  kernels follow as well.
- **Byte model.** Minimal bytes moved: every input read once and every output written once, per
  pass (`fwd+bwd` = forward + backward, as a training step must run them). `s` is the element
  size (4 for fp32, 2 for bf16):

  | op | fwd | fwd+bwd |
  |---|---|---|
  | rms_norm `[N, D]` | read x, w; write y: `2·N·D·s + D·s` | + read x, dy, w; write dx, dw: `5·N·D·s + 3·D·s` |
  | add_rms_norm `[N, D]` | read x, r, w; write y, x + r: `4·N·D·s + D·s` | + read sum, dy, dsum, w; write dx (= dr), dw: `8·N·D·s + 3·D·s` |
  | rotary q, k `[T, H, D]`, E = T·(Hq+Hk)·D, R = D/2 | read q, k, cos, sin (fp32 `[T, R]`); write q', k': `2·E·s + 2·T·R·4` | `4·E·s + 4·T·R·4` |
  | apply_mrope (angles computed in the kernel) | read q, k, position ids `[3, T]` int64, inv_freq; write q', k': `2·E·s + 3·T·8 + R·4` | `4·E·s + 2·(3·T·8 + R·4)` |
  | swiglu `[N, F]` / swiglu_packed `[N, 2F]` | read gate, up; write out: `3·N·F·s` | + read dout, gate, up; write dgate, dup: `8·N·F·s` |

  Effective bandwidth = bytes / p50 time. Baselines move more bytes than this (that is what
  fusing saves); they are still credited with the minimal bytes, so GB/s compares like with like.
- **Roofline.** Bytes / copy bandwidth, where the copy bandwidth is `out.copy_(src)` into a
  preallocated, already-touched buffer the size of the op's largest tensor, counting read + write,
  measured in the same run; the best of up to 20 copies is used, since the roofline is an upper
  bound. `% copy BW` = effective bandwidth / copy bandwidth. The fp32 GEMM rate
  (2048³) is recorded alongside.
- **Allocator.** Large CPU allocations are page-fault bound on these VMs (a fresh 64 MiB tensor
  costs several times a write into an existing buffer). `--allocator default` keeps glibc as the
  environment configures it; `--allocator tuned` calls `mmfuse.runtime.tune_allocator()` (glibc
  M_MMAP_THRESHOLD / M_TRIM_THRESHOLD raised to 1 GiB, so freed tensors are reused) before anything
  is timed; `--allocator both` runs each in its own process. Each table states its setting, and
  every provider in a table ran under the same one.
- **Targets** (CPU, from the design): fp32 `fwd+bwd` at least 2x `torch.compile` and at least 50%
  of the copy bandwidth; bf16 at least 1.5x faster than fp32 on the same shape.
- **Reproduce.** `make dev`, then `PYTHONPATH=python:. python bench/run_all.py` (the command of each
  result is printed below), `python bench/plot.py RESULTS.json`, `python bench/report.py RESULTS.json`.
  `make bench-quick` (or `--quick`) runs small shapes in about a minute to check the harness; its
  timings mean nothing. On a machine whose cores are shared, use `--threads 1`: an OpenMP barrier
  waits for a descheduled thread, which turned a 8 MiB copy from ~27 GB/s into ~2 GB/s at 2 threads
  on the 2-core build VM while another process ran. Benchmarks are not tests: the test suite makes
  no timing assertion.

## Results

{BEGIN}
No results recorded yet.
{END}
"""


def _env_lines(results: dict) -> list[str]:
    """Machine, versions, commit and date once; then the settings and rates of each run."""
    envs = results.get("environments") or [{}]
    env = envs[0]
    commit = f"{env.get('git_commit')}{' (uncommitted changes)' if env.get('git_dirty') else ''}"
    core = f"active ISA {env.get('mmfuse_active_isa')}" if env.get("mmfuse_cpp_core") else "NOT built"
    lines = [
        f"- **Machine:** {env.get('cpu_model')}; {env.get('usable_cpus')} usable CPUs ({env.get('physical_cores')} "
        f"cores), {env.get('memory_gib')} GiB; flags {', '.join(env.get('cpu_flags', []))}",
        f"- **Versions:** torch {env.get('torch')}, mmfuse {env.get('mmfuse')} (C++ core {core}), "
        f"Python {env.get('python')}, {env.get('platform')}",
        f"- **Commit:** {commit}; **date:** {env.get('date_utc')}",
    ]
    for env in envs:
        alloc = env.get("allocator", {})
        alloc_txt = env.get("allocator_setting", "default")
        if alloc.get("tuned"):
            alloc_txt += f" (mallopt thresholds {alloc['mallopt']['retain_bytes'] >> 20} MiB)"
        if alloc.get("env"):
            alloc_txt += ", env " + ", ".join(f"{k}={v}" for k, v in alloc["env"].items())
        copy = ", ".join(f"{int(k) / 2**20:.0f} MiB {v:.1f} GB/s" for k, v in (env.get("copy_gbps") or {}).items())
        extra = f"; env {env['env']}" if env.get("env") else ""
        lines.append(f"- **{env.get('threads')} threads, allocator {alloc_txt}** (THP "
                     f"{alloc.get('transparent_hugepage')}{extra}; load average at start {env.get('load_average')}): "
                     f"copy bandwidth {copy or '-'}; fp32 GEMM {env.get('sgemm_gflops', 0):.0f} GFLOP/s")
    return lines


def _label(results: dict) -> str:
    """A heading for one results file: what its environment changes about allocation."""
    envs = results.get("environments") or [results.get("environment", {})]
    env_vars = {}
    for env in envs:
        env_vars.update((env.get("allocator") or {}).get("env") or {})
    if env_vars:
        return "environment " + ", ".join(f"{k}={v}" for k, v in env_vars.items())
    return "default environment"


def render(results: dict, doc_dir: Path, images: bool = True) -> str:
    s = results.get("settings", {})
    parts = [f"Command: `{results.get('command')}`", ""]
    if s.get("quick"):
        parts += ["**Quick run (small shapes, few reps): a smoke test of the harness, not a measurement.**", ""]
    parts += _env_lines(results)
    parts += [f"- **Timing:** {s.get('warmup')} warmup, up to {s.get('reps')} reps "
              f"(at most {s.get('max_time_s')} s per measurement)", ""]
    notes = results.get("notes") or {}
    parts += ["### Targets", "", tables.targets_markdown(targets.check(results["records"])), ""]
    for key, rs in tables.groups(results["records"]):
        op = key[0]
        parts += [f"### {tables.title(key, rs)}", ""]
        img = doc_dir / "img" / f"bench_{op}.png"
        if images and img.exists():
            parts += [f"![{op}](img/{img.name})", ""]
        if op in notes:
            parts += [f"Note: {notes[op]}.", ""]
        parts += [tables.markdown_table(tables.rows(rs)), ""]
    return "\n".join(parts).rstrip() + "\n"


def update_doc(doc: Path, body: str, begin: str = BEGIN, end: str = END, heading: str | None = None) -> None:
    """Replace the text between the markers in `doc` (created with the methodology when missing).
    With `heading`, markers missing from the doc are appended under that heading at its end."""
    text = doc.read_text(encoding="utf-8") if doc.exists() else INTRO
    if heading and begin not in text and end not in text:
        text = f"{text.rstrip()}\n\n{heading}\n\n{begin}\n{end}\n"
    if begin not in text or end not in text or text.index(begin) > text.index(end):
        raise SystemExit(f"{doc}: needs one '{begin}' line followed by one '{end}' line")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(f"{head}{begin}\n{body}{end}{tail}", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/report.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, nargs="+",
                   help="results JSON(s) written by bench/run_all.py; several (e.g. one per allocation "
                        "environment) become one section each, the plots (docs/img/) belong to the first")
    p.add_argument("--doc", type=Path, default=DEFAULT_DOC, help=f"default: {DEFAULT_DOC}")
    args = p.parse_args(argv)
    step_runs = [r for r in map(read_json, args.results) if r.get("schema") == step_tables.SCHEMA]
    if step_runs:
        update_doc(args.doc, "\n".join(map(step_tables.render_markdown, step_runs)), STEP_BEGIN, STEP_END,
                   STEP_HEADING)
        args.results = [p for p in args.results if read_json(p).get("schema") != step_tables.SCHEMA]
        if not args.results:
            print(f"wrote {args.doc}")
            return 0
    if len(args.results) == 1:
        body = render(read_json(args.results[0]), args.doc.parent)
    else:
        sections = []
        for i, path in enumerate(args.results):
            results = read_json(path)
            body_i = render(results, args.doc.parent, images=(i == 0)).replace("\n### ", "\n#### ")
            sections.append(f"### Run {i + 1}: {_label(results)}\n\n{body_i}")
        body = "\n".join(sections)
    update_doc(args.doc, body)
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
