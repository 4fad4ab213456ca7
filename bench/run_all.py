"""Run the CPU op benchmarks: mmfuse against the HF eager code, PyTorch's fused op (where there is
one), torch.compile of the HF code, the op-specific baselines (SDPA layouts for attention) and the
roofline, all measured in one run on one machine; plus the peak memory of the ops that declare it.

Writes every measurement to a JSON file (machine, versions, commit, date and the command included),
prints one table per op and the targets check (met / NOT met, with the numbers).

examples:
  PYTHONPATH=python:. python bench/run_all.py --quick             # smoke run, small shapes (~1 min)
  PYTHONPATH=python:. python bench/run_all.py                     # issue shapes, fp32 + bf16
  PYTHONPATH=python:. python bench/run_all.py --ops rms_norm --dtypes fp32 --modes fwd+bwd
  PYTHONPATH=python:. python bench/run_all.py --allocator both --threads 1,2
  PYTHONPATH=python:. python bench/run_all.py --ops attention_varlen,attention_windows,cross_entropy,\
      linear_cross_entropy --dtypes fp32 --tag attention-ce    # the attention / cross-entropy issue
then: python bench/plot.py RESULTS.json ; python bench/report.py RESULTS.json [MORE.json ...]
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import `bench` from the repository root instead of the script's folder (whose
    # module names would shadow others), and fall back to an unbuilt source tree's `mmfuse`.
    _root = Path(__file__).resolve().parents[1]
    sys.path[0] = str(_root)
    try:
        import mmfuse  # noqa: F401
    except ImportError:
        sys.path.insert(1, str(_root / "python"))

import torch  # noqa: E402

from bench import common, harness, tables, targets  # noqa: E402
from bench.ops import ALL_OPS, OP_MODULES  # noqa: E402

SCHEMA = "mmfuse-bench-cpu/1"
ALLOCATORS = ("default", "tuned", "both")


def _csv(kind: str, allowed):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{kind} must be a comma list of {', '.join(allowed)}; got {text!r}")
        return list(dict.fromkeys(items))
    return parse


def _threads(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--threads must be a comma list of positive ints, got {text!r}")
    return list(dict.fromkeys(values))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/run_all.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", type=_csv("--ops", ALL_OPS), default=list(ALL_OPS), metavar="OP[,OP...]",
                   help=f"ops to measure (default: all): {', '.join(ALL_OPS)}")
    p.add_argument("--dtypes", type=_csv("--dtypes", harness.DTYPES), default=list(harness.DTYPES),
                   metavar="fp32,bf16", help="dtypes (default: fp32,bf16)")
    p.add_argument("--modes", type=_csv("--modes", harness.MODES), default=list(harness.MODES),
                   metavar="fwd,fwd+bwd", help="fwd: forward of a training step; fwd+bwd: forward then backward "
                   "(default: both)")
    p.add_argument("--quick", action="store_true",
                   help="small shapes and few reps: checks the harness end to end in about a minute; "
                        "timings are not meaningful")
    p.add_argument("--threads", type=_threads, default=None, metavar="N[,N...]",
                   help="torch.set_num_threads value(s), which mmfuse's kernels follow too; several values "
                        f"run one subprocess each (default: torch's current setting, {torch.get_num_threads()})")
    p.add_argument("--allocator", choices=ALLOCATORS, default="default",
                   help="default: glibc as configured by the environment; tuned: mmfuse.runtime.tune_allocator() "
                        "before anything is timed; both: one subprocess per setting, so the default run is not "
                        "affected by the tuned one (default: default)")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default: bench/results/cpu-<date>-<commit>[-TAG].json, with -quick for "
                        "--quick)")
    p.add_argument("--tag", default=None, help="suffix of the default results file name (e.g. attention-ce)")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the peak-memory measurements (one subprocess per provider; ops: "
                        f"{', '.join(op for op in ALL_OPS if op in getattr(OP_MODULES[op], 'MEMORY', {}))})")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per measurement (default: 3, quick 1)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per measurement (default: 30, quick 5)")
    p.add_argument("--max-time", type=float, default=None, metavar="S",
                   help="stop a measurement after S seconds of timed calls once 3 reps are done "
                        "(default: 6, quick 0.5)")
    p.add_argument("--no-tables", action="store_true", help="only the progress lines, targets and the file")
    p.add_argument("--command", default=None, help=argparse.SUPPRESS)  # the parent's command, for children
    return p


def command_line() -> str:
    """The command as typed, with the environment variables that affect it."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if argv and Path(argv[0]).name.startswith("python"):
        argv[0] = "python"
    env = [f"{k}={os.environ[k]}" for k in ("PYTHONPATH", *common.ENV_VARS) if k in os.environ]
    return shlex.join(env + argv) if env else shlex.join(argv)


def default_out(quick: bool, tag: str | None = None) -> Path:
    commit, _ = common.git_commit()
    date = time.strftime("%Y-%m-%d", time.gmtime())
    name = f"cpu-{date}-{commit or 'nogit'}{f'-{tag}' if tag else ''}{'-quick' if quick else ''}.json"
    return common.REPO_ROOT / "bench" / "results" / name


def timing_for(args) -> harness.Timing:
    q = args.quick
    return harness.Timing(warmup=args.warmup if args.warmup is not None else (1 if q else 3),
                          reps=args.reps if args.reps is not None else (5 if q else 30),
                          max_time_s=args.max_time if args.max_time is not None else (0.5 if q else 6.0))


def settings_of(args) -> dict:
    t = timing_for(args)
    return {"ops": args.ops, "dtypes": args.dtypes, "modes": args.modes, "quick": args.quick,
            "threads": args.threads, "allocator": args.allocator, "memory": not args.no_memory,
            "warmup": t.warmup, "reps": t.reps, "max_time_s": t.max_time_s}


# ---- one setting, in this process --------------------------------------------------------------

def run_here(args, allocator: str, threads: int | None) -> dict:
    """Measure everything under one allocator and thread setting; returns the results payload."""
    tuned = False
    if allocator == "tuned":
        from mmfuse.runtime import tune_allocator
        tuned = tune_allocator()
        if not tuned:
            print("warning: --allocator tuned: tune_allocator() had no effect on this platform", file=sys.stderr)
    if threads is not None:
        torch.set_num_threads(threads)
    env = common.environment()
    env["allocator_setting"] = allocator
    print(f"# {env['cpu_model']} | {env['usable_cpus']} cpus, {env['threads']} threads | torch {env['torch']} | "
          f"mmfuse {env['mmfuse']} ({env['mmfuse_active_isa'] or 'no C++ core'}) | commit {env['git_commit']}"
          f"{'+dirty' if env['git_dirty'] else ''} | allocator {allocator}{' (applied)' if tuned else ''} | "
          f"load {env['load_average']}", flush=True)
    load = (env["load_average"] or [0])[0]
    if load > 0.5 and env["threads"] > max(1, (env["usable_cpus"] or 1) - load):
        print(f"warning: load average {load:.2f} on {env['usable_cpus']} cpus: other processes compete for the "
              f"cores, so timings with {env['threads']} threads will be noisy (OpenMP barriers wait for "
              "descheduled threads)", file=sys.stderr)
    if not env["mmfuse_cpp_core"]:
        print(f"warning: mmfuse's C++ core is not built ({env['mmfuse_cpp_error']}); the mmfuse rows time the "
              "pure-PyTorch reference", file=sys.stderr)

    dtypes = [harness.DTYPES[d] for d in args.dtypes]
    cases = [c for op in args.ops for c in OP_MODULES[op].cases(op, args.quick, dtypes)]
    # Peak memory is measured under the default allocator only: a tuned one keeps freed memory
    # resident, which is not what the measurement is about.
    memory_ops = [] if args.no_memory or allocator != "default" else \
        [(op, OP_MODULES[op].MEMORY[op]) for op in args.ops if op in getattr(OP_MODULES[op], "MEMORY", {})]
    total = sum(len(c.providers) for c in cases) * len(args.modes) + \
        sum(len(providers) for _, providers in memory_ops) * len(dtypes)
    say = harness.stderr_progress(total)
    t0 = time.perf_counter()
    env["sgemm_gflops"] = common.sgemm_gflops(512 if args.quick else 2048)
    records = []
    timing = timing_for(args)
    for case in cases:
        records += harness.run_case(case, args.modes, timing, allocator=allocator, progress=say,
                                    gemm_gflops=env["sgemm_gflops"])
    memory = []
    for op, providers in memory_ops:
        memory += harness.peak_memory_records(OP_MODULES[op].__name__, op, dtypes, providers, args.quick,
                                              progress=say)
    env["copy_gbps"] = common.copy_bandwidth_measurements()
    env["wall_s"] = round(time.perf_counter() - t0, 1)
    # Other processes may start during a long run: the load at the end tells whether it stayed quiet.
    env["load_average_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return {"schema": SCHEMA, "command": args.command or command_line(), "created_utc": common.utc_now(),
            "settings": settings_of(args), "environments": [env], "records": records, "memory": memory,
            "notes": {c.op: c.note for c in cases if c.note}}


# ---- several settings, one subprocess each -----------------------------------------------------

def run_children(args, combos: list[tuple[str, int | None]]) -> dict:
    command = args.command or command_line()
    merged = None
    with tempfile.TemporaryDirectory(prefix="mmfuse-bench-") as tmp:
        for i, (allocator, threads) in enumerate(combos):
            out = Path(tmp) / f"{i}.json"
            argv = [sys.executable, str(Path(__file__).resolve()), "--ops", ",".join(args.ops),
                    "--dtypes", ",".join(args.dtypes), "--modes", ",".join(args.modes),
                    "--allocator", allocator, "--out", str(out), "--command", command]
            if threads is not None:
                argv += ["--threads", str(threads)]
            if args.quick:
                argv.append("--quick")
            if args.no_tables:
                argv.append("--no-tables")
            if args.no_memory:
                argv.append("--no-memory")
            for flag, value in (("--warmup", args.warmup), ("--reps", args.reps), ("--max-time", args.max_time)):
                if value is not None:
                    argv += [flag, str(value)]
            print(f"\n## setting {i + 1}/{len(combos)}: allocator {allocator}, threads "
                  f"{threads if threads is not None else 'default'}", flush=True)
            subprocess.run(argv, check=True)
            part = common.read_json(out)
            if merged is None:
                merged = part
            else:
                merged["environments"] += part["environments"]
                merged["records"] += part["records"]
                merged["memory"] += part.get("memory", [])
    merged["settings"] = settings_of(args)
    merged["command"] = command
    return merged


def allocator_comparison(records: list[dict]) -> str:
    """default vs tuned p50 for every measured row, when both were run."""
    tuned = {(r["op"], r["shape"], r["dtype"], r["mode"], r["provider"], r["threads"]): r
             for r in records if r["allocator"] == "tuned" and r["status"] == "ok"}
    lines = []
    for r in records:
        key = (r["op"], r["shape"], r["dtype"], r["mode"], r["provider"], r["threads"])
        if r["allocator"] == "default" and r["status"] == "ok" and key in tuned:
            t = tuned[key]["p50_ms"]
            lines.append((r["op"], r["dtype"], r["mode"], r["provider"], str(r["threads"]),
                          f"{r['p50_ms']:.3f}", f"{t:.3f}", f"{r['p50_ms'] / t:.2f}"))
    if not lines:
        return ""
    header = ("op", "dtype", "mode", "provider", "threads", "default ms", "tuned ms", "default/tuned")
    return tables.text_table(lines, header, left=5)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    allocators = ["default", "tuned"] if args.allocator == "both" else [args.allocator]
    threads = args.threads or [None]
    combos = [(a, t) for a in allocators for t in threads]
    out = args.out or default_out(args.quick, args.tag)
    if len(combos) > 1:
        payload = run_children(args, combos)
    else:
        payload = run_here(args, *combos[0])
    payload["targets"] = targets.check(payload["records"], payload["memory"])
    path = common.write_json(out, payload)

    if len(combos) == 1 and not args.no_tables:
        print()
        print(tables.format_text(payload["records"]))
        if payload["memory"]:
            print()
            print(tables.memory_text(payload["memory"]))
    if len(combos) == 1 or args.command is None:
        print("\ntargets (mmfuse):")
        print(tables.targets_text(payload["targets"]))
    if len(combos) > 1 and "tuned" in allocators and "default" in allocators:
        comparison = allocator_comparison(payload["records"])
        if comparison:
            print("\nallocator: default vs tuned (p50)")
            print(comparison)
    skipped = sorted({f"{r['op']} ({r['reason']})" for r in payload["records"]
                      if r["provider"] == harness.MMFUSE and r["status"] == "skipped"})
    if skipped:
        print(f"\nskipped: {'; '.join(skipped)}")
    errors = [r for r in payload["records"] + payload["memory"] if r["status"] == "error"]
    for r in errors:
        print(f"error: {r['op']} {r['dtype']} {r['mode']} {r['provider']}: {r['reason']}")
    if args.command is None:  # a child's file is a temporary the parent merges
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
