"""One benchmark case (op x shape x dtype) measured for every provider and mode, as flat records.

A provider is a function of the case's input dict that returns the op's output(s). Modes:
  fwd      the forward of a training step (inputs require grad, so autograd state is saved)
  fwd+bwd  forward, then backward of every output with fixed random output gradients; input
           gradients are reset to None before each rep (untimed), as `zero_grad(set_to_none=True)`
The roofline is the case's minimal bytes divided by the copy bandwidth measured in this run.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from bench.common import copy_bandwidth_gbps, time_ms

MODES = ("fwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

MMFUSE = "mmfuse"
ROOFLINE = "roofline"
# Baselines in the order the tables show them.
BASELINES = ("hf_eager", "torch_fused", "torch_compile")

RECORD_FIELDS = ("op", "shape", "dims", "dtype", "mode", "provider", "status", "reason", "threads",
                 "allocator", "p50_ms", "p20_ms", "p80_ms", "reps", "bytes", "bytes_model", "gbps",
                 "copy_gbps", "frac_copy_bw", "mmfuse_speedup", "speedup_vs")


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
    """torch.compile of `fn`, compiled on first call (a warmup) and reused for every rep."""
    return torch.compile(fn, dynamic=False)


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _runner(fn: Callable[[dict], Any], inputs: dict, mode: str) -> Callable[[], object]:
    if mode == "fwd":
        return lambda: fn(inputs)
    # Output gradients: fixed random tensors shaped like the outputs (one probe call learns them).
    probe = _as_tuple(fn(inputs))
    grads = tuple(torch.randn_like(o) for o in probe)
    del probe

    def fwd_bwd():
        torch.autograd.backward(_as_tuple(fn(inputs)), grads)
    return fwd_bwd


def _record(case: Case, mode: str, provider: str, status: str, reason: str | None = None, **kw) -> dict:
    rec = dict.fromkeys(RECORD_FIELDS)
    rec.update(op=case.op, shape=case.shape, dims=dict(case.dims), dtype=DTYPE_NAMES[case.dtype], mode=mode,
               provider=provider, status=status, reason=reason, threads=torch.get_num_threads(),
               bytes=case.bytes[mode], bytes_model=case.bytes_model[mode])
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


def run_case(case: Case, modes=MODES, timing: Timing | None = None, allocator: str = "default",
             progress: Callable[[str], None] | None = None) -> list[dict]:
    """Measure every provider of `case` in every mode; returns one record per (mode, provider),
    plus the roofline. Skipped and failing providers are recorded with their reason."""
    timing = timing or Timing()
    say = progress or (lambda msg: None)
    copy_gbps = copy_bandwidth_gbps(case.copy_nbytes)
    inputs = case.make_inputs()
    leaves = [inputs[n] for n in case.grad_inputs]
    records = []
    for mode in modes:
        nbytes = case.bytes[mode]
        roof_ms = nbytes / (copy_gbps * 1e9) * 1e3
        records.append(_record(case, mode, ROOFLINE, "model", p50_ms=roof_ms, p20_ms=roof_ms, p80_ms=roof_ms,
                               reps=0, gbps=copy_gbps, copy_gbps=copy_gbps, frac_copy_bw=1.0))
        for prov in case.providers:
            label = f"{case.op} {case.shape} {DTYPE_NAMES[case.dtype]} {mode} {prov.name}"
            if prov.fn is None:
                say(f"{label}: skipped: {prov.skip}")
                records.append(_record(case, mode, prov.name, "skipped", prov.skip, copy_gbps=copy_gbps))
                continue
            t0 = time.perf_counter()
            try:
                run = _runner(prov.fn, inputs, mode)
                t = time_ms(run, timing.warmup, timing.reps, grad_to_none=leaves,
                            max_time_s=timing.max_time_s, min_reps=timing.min_reps)
            except Exception as exc:  # a broken provider is reported, and the others still run
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                say(f"{label}: error: {reason}")
                records.append(_record(case, mode, prov.name, "error", reason, copy_gbps=copy_gbps))
                continue
            finally:
                for leaf in leaves:
                    leaf.grad = None
            gbps = nbytes / (t["p50_ms"] * 1e-3) / 1e9
            say(f"{label}: {t['p50_ms']:.3f} ms ({gbps:.1f} GB/s, {t['reps']} reps, "
                f"{time.perf_counter() - t0:.1f} s)")
            records.append(_record(case, mode, prov.name, "ok", p50_ms=t["p50_ms"], p20_ms=t["p20_ms"],
                                   p80_ms=t["p80_ms"], reps=t["reps"], gbps=gbps, copy_gbps=copy_gbps,
                                   frac_copy_bw=gbps / copy_gbps))
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
