"""Write a results JSON into docs/performance.md as markdown: machine, versions, commit, date, the
exact command, the targets check, one table per op and shape, and the peak-memory tables. Only the
text between the `<!-- bench:begin -->` and `<!-- bench:end -->` markers is replaced; the file (with
its methodology section) is created when missing. Several results files become one section each,
so a run of some ops does not replace the tables of another. A training-step result of
bench/models/bench_qwen2_5_vl_step.py goes between `<!-- bench-step:begin -->` and
`<!-- bench-step:end -->` instead (appended to the file when those markers are missing).

  python bench/report.py bench/results/cpu-2026-11-28-b266703-default.json [MORE.json ...] \
      [--doc docs/performance.md]
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
  | cross_entropy `[N, V]` | read logits: `N·V·s` | + read logits, write dlogits: `3·N·V·s` |

  Effective bandwidth = bytes / p50 time. Baselines move more bytes than this (that is what
  fusing saves); they are still credited with the minimal bytes, so GB/s compares like with like.
- **Roofline.** Bytes / copy bandwidth, where the copy bandwidth is `out.copy_(src)` into a
  preallocated, already-touched buffer the size of the op's largest tensor, counting read + write,
  measured in the same run; the best of up to 20 copies is used, since the roofline is an upper
  bound. `% copy BW` = effective bandwidth / copy bandwidth. The fp32 GEMM rate
  (2048³) is recorded alongside.
- **Compute-bound ops** (attention, linear_cross_entropy) are held to FLOPs instead: GFLOP/s =
  model FLOPs / p50 time, `% GEMM` = GFLOP/s / the fp32 GEMM rate measured in the same run, and
  the roofline is FLOPs / GEMM rate. Attention counts FlashAttention's way: fwd
  `4·pairs·Hq·D` over the query-key pairs actually attended (`Σ L(L+1)/2` causal, `T·W` for
  windows of W), bwd 2.5x fwd; linear_cross_entropy `2·N·H·V` per GEMM (fwd 1, fwd+bwd 3). Every
  provider is credited with the same useful FLOPs, so a padded baseline's wasted work shows as a
  lower rate. Their baselines are named in each table's note (`sdpa_padded`, `sdpa_loop`,
  `hf_window_loop`, `sdpa_batched`); `mmfuse x faster` = the row's time / mmfuse's.
- **Peak memory** (linear_cross_entropy): one fwd+bwd per provider, each in a fresh process after
  a small warm-up, output gradients of ones (`loss.backward()`). torch's CPU tensors are invisible
  to tracemalloc, so the kernel's accounting is read: the resident-set high-water mark is reset
  (`/proc/self/clear_refs` 5) once the inputs exist, and peak extra = VmHWM after the step - VmRSS
  before it. It includes the input gradients the step returns (shown apart).
- **Allocator.** Large CPU allocations are page-fault bound on these VMs (a fresh 64 MiB tensor
  costs several times a write into an existing buffer). `--allocator default` keeps glibc as the
  environment configures it; `--allocator tuned` calls `mmfuse.runtime.tune_allocator()` (glibc
  M_MMAP_THRESHOLD / M_TRIM_THRESHOLD raised to 1 GiB, so freed tensors are reused) before anything
  is timed; `--allocator both` runs each in its own process. Each table states its setting, and
  every provider in a table ran under the same one.
- **Targets** (CPU, from the design): fp32 `fwd+bwd` at least 2x `torch.compile` and at least 50%
  of the copy bandwidth; bf16 at least 1.5x faster than fp32 on the same shape. Compute-bound ops
  (from the attention / cross-entropy issue, fp32): packed varlen attention >= 3x `sdpa_padded` and
  >= 1.2x `sdpa_loop`; vision windows >= 5x `hf_window_loop`; linear_cross_entropy fwd+bwd time
  <= 1.1x and peak extra memory <= 1/4 of `F.linear` + `F.cross_entropy`.
- **Reproduce.** `make dev`, then `PYTHONPATH=python:. python bench/run_all.py` (the command of each
  result is printed below), `python bench/plot.py RESULTS.json`, `python bench/report.py RESULTS.json
  [MORE.json ...]` (one section per file).
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
        end = f", at end {env['load_average_end']}" if env.get("load_average_end") else ""
        lines.append(f"- **{env.get('threads')} threads, allocator {alloc_txt}** (THP "
                     f"{alloc.get('transparent_hugepage')}{extra}; "
                     f"load average at start {env.get('load_average')}{end}): "
                     f"copy bandwidth {copy or '-'}; fp32 GEMM {env.get('sgemm_gflops', 0):.0f} GFLOP/s")
    return lines


def _label(results: dict) -> str:
    """A heading for one results file: its ops and what its environment changes about allocation."""
    envs = results.get("environments") or [results.get("environment", {})]
    env_vars = {}
    for env in envs:
        env_vars.update((env.get("allocator") or {}).get("env") or {})
    ops = ", ".join(dict.fromkeys(r["op"] for r in results.get("records", [])))
    if env_vars:
        return f"{ops}; environment " + ", ".join(f"{k}={v}" for k, v in env_vars.items())
    return f"{ops}; default environment"


def render(results: dict, doc_dir: Path, images: bool | set[str] = True) -> str:
    """Markdown for one results file. `images`: whether to show each op's plot (docs/img/), or the
    set of ops whose plot to show."""
    s = results.get("settings", {})
    parts = [f"Command: `{results.get('command')}`", ""]
    if s.get("quick"):
        parts += ["**Quick run (small shapes, few reps): a smoke test of the harness, not a measurement.**", ""]
    parts += _env_lines(results)
    parts += [f"- **Timing:** {s.get('warmup')} warmup, up to {s.get('reps')} reps "
              f"(at most {s.get('max_time_s')} s per measurement)", ""]
    notes = results.get("notes") or {}
    memory = results.get("memory") or []
    parts += ["### Targets", "", tables.targets_markdown(targets.check(results["records"], memory)), ""]
    for key, rs in tables.groups(results["records"]):
        op = key[0]
        parts += [f"### {tables.title(key, rs)}", ""]
        img = doc_dir / "img" / f"bench_{op}.png"
        if (op in images if isinstance(images, set) else images) and img.exists():
            parts += [f"![{op}](img/{img.name})", ""]
        if op in notes:
            parts += [f"Note: {notes[op]}.", ""]
        parts += [tables.markdown_table(tables.rows(rs), tables.header(rs)), ""]
    for key, ms in tables.memory_groups(memory):
        parts += [f"### {tables.memory_title(key)}", "", tables.memory_method(ms), "",
                  tables.markdown_table(tables.memory_rows(ms), tables.MEMORY_HEADER), ""]
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
                        "environment, or per set of ops) become one section each; an op's plot (docs/img/) "
                        "goes with the first file that has the op")
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
        shown: set[str] = set()
        for i, path in enumerate(args.results):
            results = read_json(path)
            # An op's plot is drawn from one file: show it in the first section that has the op.
            ops = {r["op"] for r in results["records"]} - shown
            shown |= ops
            body_i = render(results, args.doc.parent, images=ops).replace("\n### ", "\n#### ")
            sections.append(f"### Run {i + 1}: {_label(results)}\n\n{body_i}")
        body = "\n".join(sections)
    update_doc(args.doc, body)
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
