"""One benchmark case (op x shape x dtype) measured for every provider and mode, as flat records.

A provider is a function of the case's input dict that returns the op's output(s). Modes:
  fwd      the forward of a training step (inputs require grad, so autograd state is saved)
  fwd+bwd  forward, then backward of every output with fixed random output gradients; input
           gradients are reset to None before each rep (untimed), as `zero_grad(set_to_none=True)`
The roofline of a memory-bound case is its minimal bytes divided by the copy bandwidth measured in
this run; a compute-bound case (one that gives `flops`) is held to its FLOPs divided by the fp32
GEMM rate measured in this run instead, and its records carry GFLOP/s and the fraction of that rate.

Peak memory is not a mode: `peak_memory_records` runs one fwd+bwd per provider, each in a fresh
subprocess (so one provider's high-water mark cannot hide another's), and reports how far the
resident set rose above the inputs (`peak_rss_growth`).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from bench.common import REPO_ROOT, copy_bandwidth_gbps, sgemm_gflops, time_ms
from bench.models.peak_memory import PeakRss

MODES = ("fwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

MMFUSE = "mmfuse"
ROOFLINE = "roofline"
# Baselines in the order the tables show them.
BASELINES = ("hf_eager", "torch_fused", "torch_compile")

RECORD_FIELDS = ("op", "shape", "dims", "dtype", "mode", "provider", "status", "reason", "threads",
                 "allocator", "p50_ms", "p20_ms", "p80_ms", "reps", "bytes", "bytes_model", "gbps",
                 "copy_gbps", "frac_copy_bw", "mmfuse_speedup", "speedup_vs", "bound", "flops", "flops_model",
                 "gflops", "gemm_gflops", "frac_gemm")
MEMORY_FIELDS = ("op", "shape", "dims", "dtype", "mode", "provider", "status", "reason", "threads", "extra_bytes",
                 "grad_bytes", "input_bytes", "rss_before_bytes", "seconds", "method", "extra_vs")


@dataclass
class Provider:
    name: str
    fn: Callable[[dict], Any] | None = None
    skip: str | None = None  # why it is not measured (recorded, printed, never silent)


@dataclass
class Case:
    op: str
    shape: str                          # "8192x2048", as printed
    dims: dict[str, int]                # named sizes, for reports
    dtype: torch.dtype
    make_inputs: Callable[[], dict]     # name -> tensor (built once per case, untimed)
    grad_inputs: tuple[str, ...]        # leaves whose gradients the backward produces
    bytes: dict[str, int]               # mode -> minimal bytes (each input read once, output written once)
    bytes_model: dict[str, str]         # mode -> the formula behind `bytes`
    copy_nbytes: int                    # size of the copy that measures the roofline bandwidth
    providers: list[Provider] = field(default_factory=list)
    note: str = ""
    flops: dict[str, float] | None = None       # mode -> FLOPs: given for compute-bound cases (GEMM roofline)
    flops_model: dict[str, str] | None = None   # mode -> the formula behind `flops`
    warmup: int | None = None                   # at most this many warmup calls (for calls that take seconds)

    @property
    def bound(self) -> str:
        return "compute" if self.flops else "memory"


@dataclass
class Timing:
    warmup: int = 2
    reps: int = 10
    max_time_s: float | None = 3.0
    min_reps: int = 3


def mmfuse_op(name: str, call: Callable[[Callable, dict], Any]) -> Provider:
    """The mmfuse provider running `call(mmfuse.ops.<name>, inputs)`, or a skip (with the reason)
    when this build of mmfuse does not have the op yet."""
    import mmfuse.ops

    op = getattr(mmfuse.ops, name, None)
    if op is None:
        return Provider(MMFUSE, skip=f"mmfuse.ops.{name} not available")
    return Provider(MMFUSE, fn=lambda inputs: call(op, inputs))


def compiled(fn: Callable) -> Callable:
    """torch.compile of `fn`, compiled on first call (a warmup) and reused for every rep. The
    wrapper itself is made on first call too: creating it imports dynamo (~2.5 s), which building
    cases that never run it (memory subprocesses, other providers) should not pay."""
    wrapper: list[Callable] = []

    def call(*args, **kwargs):
        if not wrapper:
            wrapper.append(torch.compile(fn, dynamic=False))
        return wrapper[0](*args, **kwargs)
    return call


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _runner(fn: Callable[[dict], Any], inputs: dict, mode: str) -> Callable[[], object]:
    if mode == "fwd":
        return lambda: fn(inputs)
    # Output gradients: random tensors shaped like the outputs, drawn on the first call (a warmup
    # call) and reused: a separate probe forward would cost as much as a rep, tens of seconds for
    # the LM-head cases.
    grads: list[tuple[torch.Tensor, ...]] = []

    def fwd_bwd():
        outs = _as_tuple(fn(inputs))
        if not grads:
            grads.append(tuple(torch.randn_like(o) for o in outs))
        torch.autograd.backward(outs, grads[0])
    return fwd_bwd


def _record(case: Case, mode: str, provider: str, status: str, reason: str | None = None, **kw) -> dict:
    rec = dict.fromkeys(RECORD_FIELDS)
    rec.update(op=case.op, shape=case.shape, dims=dict(case.dims), dtype=DTYPE_NAMES[case.dtype], mode=mode,
               provider=provider, status=status, reason=reason, threads=torch.get_num_threads(),
               bytes=case.bytes[mode], bytes_model=case.bytes_model[mode], bound=case.bound)
    if case.flops:
        rec.update(flops=case.flops[mode], flops_model=case.flops_model[mode])
    rec.update(kw)
    return rec


def add_speedups(records: list[dict]) -> None:
    """Fill `mmfuse_speedup` (this provider's time / mmfuse's: how many times faster mmfuse is) on
    every record, and `speedup_vs` ({baseline: ratio}) on mmfuse's, within each case and mode."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        key = (r["op"], r["shape"], r["dtype"], r["mode"], r["threads"], r["allocator"])
        groups.setdefault(key, []).append(r)
    for group in groups.values():
        mm = next((r for r in group if r["provider"] == MMFUSE and r["status"] == "ok"), None)
        for r in group:
            ok = r["p50_ms"] is not None and r["status"] in ("ok", "model")
            r["mmfuse_speedup"] = r["p50_ms"] / mm["p50_ms"] if (mm and ok) else None
        if mm:
            mm["speedup_vs"] = {r["provider"]: r["mmfuse_speedup"] for r in group
                                if r["provider"] not in (MMFUSE, ROOFLINE) and r["mmfuse_speedup"] is not None}


def _rates(case: Case, mode: str, ms: float, copy_gbps: float, gemm_gflops: float | None) -> dict:
    """GB/s and fraction of the copy bandwidth; for compute-bound cases also GFLOP/s and fraction
    of the GEMM rate."""
    gbps = case.bytes[mode] / (ms * 1e-3) / 1e9
    rates = {"gbps": gbps, "copy_gbps": copy_gbps, "frac_copy_bw": gbps / copy_gbps}
    if case.flops:
        gflops = case.flops[mode] / (ms * 1e-3) / 1e9
        rates.update(gflops=gflops, gemm_gflops=gemm_gflops, frac_gemm=gflops / gemm_gflops)
    return rates


def run_case(case: Case, modes=MODES, timing: Timing | None = None, allocator: str = "default",
             progress: Callable[[str], None] | None = None, gemm_gflops: float | None = None) -> list[dict]:
    """Measure every provider of `case` in every mode; returns one record per (mode, provider),
    plus the roofline. Skipped and failing providers are recorded with their reason. `gemm_gflops`
    is the run's fp32 GEMM rate (measured here, 2048³, when a compute-bound case needs it)."""
    timing = timing or Timing()
    say = progress or (lambda msg: None)
    copy_gbps = copy_bandwidth_gbps(case.copy_nbytes)
    if case.flops and gemm_gflops is None:
        gemm_gflops = sgemm_gflops()
    warmup = timing.warmup if case.warmup is None else min(case.warmup, timing.warmup)
    inputs = case.make_inputs()
    leaves = [inputs[n] for n in case.grad_inputs]
    records = []
    for mode in modes:
        nbytes = case.bytes[mode]
        if case.flops:
            roof_ms = case.flops[mode] / (gemm_gflops * 1e9) * 1e3
            roof = _rates(case, mode, roof_ms, copy_gbps, gemm_gflops)
            roof.update(gflops=gemm_gflops, frac_gemm=1.0)
        else:
            roof_ms = nbytes / (copy_gbps * 1e9) * 1e3
            roof = {"gbps": copy_gbps, "copy_gbps": copy_gbps, "frac_copy_bw": 1.0}
        records.append(_record(case, mode, ROOFLINE, "model", p50_ms=roof_ms, p20_ms=roof_ms, p80_ms=roof_ms,
                               reps=0, **roof))
        for prov in case.providers:
            label = f"{case.op} {case.shape} {DTYPE_NAMES[case.dtype]} {mode} {prov.name}"
            if prov.fn is None:
                say(f"{label}: skipped: {prov.skip}")
                records.append(_record(case, mode, prov.name, "skipped", prov.skip, copy_gbps=copy_gbps))
                continue
            t0 = time.perf_counter()
            try:
                run = _runner(prov.fn, inputs, mode)
                t = time_ms(run, warmup, timing.reps, grad_to_none=leaves,
                            max_time_s=timing.max_time_s, min_reps=timing.min_reps)
            except Exception as exc:  # a broken provider is reported, and the others still run
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                say(f"{label}: error: {reason}")
                records.append(_record(case, mode, prov.name, "error", reason, copy_gbps=copy_gbps))
                continue
            finally:
                for leaf in leaves:
                    leaf.grad = None
            rates = _rates(case, mode, t["p50_ms"], copy_gbps, gemm_gflops)
            rate = (f"{rates['gflops']:.1f} GFLOP/s" if case.flops else f"{rates['gbps']:.1f} GB/s")
            say(f"{label}: {t['p50_ms']:.3f} ms ({rate}, {t['reps']} reps, {time.perf_counter() - t0:.1f} s)")
            records.append(_record(case, mode, prov.name, "ok", p50_ms=t["p50_ms"], p20_ms=t["p20_ms"],
                                   p80_ms=t["p80_ms"], reps=t["reps"], **rates))
    for r in records:
        r["allocator"] = allocator
    add_speedups(records)
    return records


def stderr_progress(total: int) -> Callable[[str], None]:
    """A progress callback printing `[done/total elapsed] message` to stderr."""
    state = {"n": 0, "t0": time.perf_counter()}

    def say(msg: str) -> None:
        state["n"] += 1
        print(f"[{state['n']:>3}/{total} {time.perf_counter() - state['t0']:6.1f}s] {msg}",
              file=sys.stderr, flush=True)
    return say


# ---- peak memory (one fresh process per provider) ----------------------------------------------

def _memory_record(spec: dict, status: str, reason: str | None = None, **kw) -> dict:
    rec = dict.fromkeys(MEMORY_FIELDS)
    rec.update(op=spec["op"], dtype=spec["dtype"], mode="fwd+bwd", provider=spec["provider"], status=status,
               reason=reason, threads=spec["threads"])
    rec.update(kw)
    return rec


def peak_rss_growth(fn: Callable[[], object]) -> dict:
    """Run `fn` once; how far the resident set rose above its level just before (`extra_bytes`),
    with the time taken and the method. torch's CPU tensors are invisible to tracemalloc, so this
    reads the kernel's high-water mark, reset right before the call (`PeakRss`)."""
    rss = PeakRss()
    gc.collect()
    before = rss.current()
    rss.reset()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return {"extra_bytes": rss.peak() - before, "rss_before_bytes": before, "seconds": seconds,
            "method": f"{rss.method} - VmRSS before"}


def _peak_child(spec: dict) -> dict:
    """In a fresh process: build the case's inputs, run one fwd+bwd of the provider at the module's
    quick shape as a warm-up (thread pool, kernel dispatch, allocator arenas: one-time costs that a
    training step does not pay again), then measure one fwd+bwd on the inputs with output gradients
    of ones, as `loss.backward()` does."""
    import importlib

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    module = importlib.import_module(spec["module"])
    dtype = DTYPES[spec["dtype"]]

    def prepared(quick, shape):
        case = module.cases(spec["op"], quick, [dtype], shape)[0]
        prov = next((p for p in case.providers if p.name == spec["provider"]), None)
        if prov is None:
            raise ValueError(f"{spec['op']} has no provider {spec['provider']!r}")
        if prov.fn is None:
            raise RuntimeError(f"skipped: {prov.skip}")
        inputs = case.make_inputs()
        leaves = [inputs[n] for n in case.grad_inputs]

        def step():
            outs = _as_tuple(prov.fn(inputs))
            torch.autograd.backward(outs, tuple(torch.ones_like(o) for o in outs))
        return case, inputs, leaves, step

    _, _, _, warm = prepared(True, None)
    warm()
    del warm
    case, inputs, leaves, step = prepared(spec["quick"], spec["shape"])
    measured = peak_rss_growth(step)
    grad_bytes = sum(t.grad.numel() * t.grad.element_size() for t in leaves if t.grad is not None)
    input_bytes = sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))
    return {"shape": case.shape, "dims": dict(case.dims), "grad_bytes": grad_bytes, "input_bytes": input_bytes,
            **measured}


_CHILD = ("import json, sys\nfrom bench.harness import _peak_child\n"
          "print('@result ' + json.dumps(_peak_child(json.loads(sys.argv[1]))))")


def peak_memory(module: str, op: str, dtype: str, provider: str, quick: bool, shape=None,
                timeout_s: float = 1800) -> dict:
    """One memory record: `provider`'s fwd+bwd of `op` in a fresh subprocess (see `_peak_child`)."""
    import mmfuse

    spec = {"module": module, "op": op, "dtype": dtype, "provider": provider, "quick": quick, "shape": shape,
            "threads": torch.get_num_threads()}
    # The child imports the same `bench` and `mmfuse` as this process, whatever sys.path tricks got
    # them here.
    paths = [str(REPO_ROOT), str(Path(mmfuse.__file__).resolve().parents[1])]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True,
                              env=env, cwd=REPO_ROOT, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return _memory_record(spec, "error", f"timed out after {timeout_s:.0f} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@result ")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        status = "skipped" if "RuntimeError: skipped: " in err else "error"
        return _memory_record(spec, status, err.split("skipped: ", 1)[-1] if status == "skipped" else err)
    return _memory_record(spec, "ok", **json.loads(lines[-1][len("@result "):]))


def add_memory_ratios(records: list[dict]) -> None:
    """`extra_vs` ({baseline: mmfuse's extra bytes / the baseline's}) on mmfuse's memory records."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["op"], r["dtype"], r["threads"]), []).append(r)
    for group in groups.values():
        mm = next((r for r in group if r["provider"] == MMFUSE and r["status"] == "ok"), None)
        if mm:
            mm["extra_vs"] = {r["provider"]: mm["extra_bytes"] / r["extra_bytes"] for r in group
                              if r is not mm and r["status"] == "ok" and r["extra_bytes"] > 0}


def peak_memory_records(module: str, op: str, dtypes, providers: tuple[str, ...], quick: bool, shape=None,
                        progress: Callable[[str], None] | None = None) -> list[dict]:
    """Peak memory of one fwd+bwd for each dtype x provider, each in its own process."""
    import importlib

    say = progress or (lambda msg: None)
    records = []
    for dtype in dtypes:
        case = importlib.import_module(module).cases(op, quick, [dtype], shape)[0]  # names the shape, even on errors
        for provider in providers:
            t0 = time.perf_counter()
            rec = {**peak_memory(module, op, DTYPE_NAMES[dtype], provider, quick, shape),
                   "shape": case.shape, "dims": dict(case.dims)}
            if rec["status"] == "ok":
                say(f"{op} {rec['shape']} {rec['dtype']} peak memory {provider}: +{rec['extra_bytes'] / 2**20:.1f} MiB "
                    f"({time.perf_counter() - t0:.1f} s)")
            else:
                say(f"{op} {rec['dtype']} peak memory {provider}: {rec['status']}: {rec['reason']}")
            records.append(rec)
    add_memory_ratios(records)
    return records
