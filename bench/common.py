"""Timing, machine rates and environment capture shared by the CPU benchmarks.

Times are wall-clock medians with the 20th/80th percentiles (the quantiles Liger-Kernel and
`triton.testing.do_bench` report). Threads follow `torch.set_num_threads`, which mmfuse's kernels
read too, so one setting governs every provider.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# Environment variables that change CPU timings; recorded with every result file.
ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_PROC_BIND", "OMP_PLACES", "OMP_WAIT_POLICY",
            "GOMP_SPINCOUNT", "KMP_AFFINITY", "THP_MEM_ALLOC_ENABLE", "MALLOC_MMAP_THRESHOLD_",
            "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "GLIBC_TUNABLES", "LD_PRELOAD", "MMFUSE_BACKEND",
            "TORCHINDUCTOR_FREEZING", "TORCHINDUCTOR_CPP_WRAPPER")


# ---- timing ------------------------------------------------------------------------------------

def quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default method)."""
    if not sorted_values:
        raise ValueError("quantile of an empty list")
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_ms(fn: Callable[[], object], warmup: int = 2, reps: int = 10,
            grad_to_none: Iterable[torch.Tensor] = (), max_time_s: float | None = None,
            min_reps: int = 3) -> dict:
    """Run `fn` `warmup` times, then time up to `reps` calls; returns p50/p20/p80/min/mean in ms.

    Before every call (untimed) the `.grad` of each tensor in `grad_to_none` is reset to None, so a
    backward allocates its gradients as a training step after `zero_grad(set_to_none=True)` does and
    never accumulates into the previous rep's. Whatever `fn` returns is released after the clock
    stops. With `max_time_s`, timing stops once that much time was spent and `min_reps` are done,
    which bounds slow baselines on large shapes. The garbage collector is paused while timing.
    """
    grads = list(grad_to_none)

    def reset():
        for t in grads:
            t.grad = None

    for _ in range(warmup):
        reset()
        out = fn()
        del out
    times = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        spent = 0.0
        for _ in range(max(reps, 1)):
            reset()
            t0 = time.perf_counter()
            out = fn()
            t1 = time.perf_counter()
            del out
            times.append((t1 - t0) * 1e3)
            spent += t1 - t0
            if max_time_s is not None and spent >= max_time_s and len(times) >= min_reps:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    reset()
    s = sorted(times)
    return {"p50_ms": quantile(s, 0.5), "p20_ms": quantile(s, 0.2), "p80_ms": quantile(s, 0.8),
            "min_ms": s[0], "mean_ms": sum(s) / len(s), "reps": len(s)}


# ---- machine rates (measured in the same run as the ops) --------------------------------------

_copy_cache: dict[int, float] = {}


def copy_bandwidth_gbps(nbytes: int, warmup: int = 2, reps: int = 20) -> float:
    """Copy bandwidth in GB/s (1e9 B/s) counting read + write: `out.copy_(src)` of `nbytes` into a
    preallocated, already-touched buffer (no page faults inside the timing). The roofline's
    denominator, so the best rep is used: a roofline is an upper bound, and one stalled rep on a
    shared machine must not lower it (op times use the median). Cached per size for the process."""
    nbytes = max(int(nbytes), 4096)
    if nbytes not in _copy_cache:
        src = torch.ones(nbytes // 4, dtype=torch.float32)
        out = torch.zeros_like(src)
        t = time_ms(lambda: out.copy_(src), warmup=warmup, reps=reps, max_time_s=1.0)
        _copy_cache[nbytes] = 2 * src.numel() * 4 / (t["min_ms"] * 1e-3) / 1e9
    return _copy_cache[nbytes]


def copy_bandwidth_measurements() -> dict[str, float]:
    """Every copy bandwidth measured so far: {bytes: GB/s}."""
    return {str(k): v for k, v in sorted(_copy_cache.items())}


_gemm_cache: dict[int, float] = {}


def sgemm_gflops(n: int = 2048, warmup: int = 2, reps: int = 5) -> float:
    """fp32 GEMM rate in GFLOP/s (2·n³ per n×n×n product, into a preallocated output), p50.
    Cached per size for the process, so the run's header and its compute-bound rooflines use one
    measurement."""
    if n not in _gemm_cache:
        a = torch.randn(n, n)
        b = torch.randn(n, n)
        c = torch.empty(n, n)
        t = time_ms(lambda: torch.mm(a, b, out=c), warmup=warmup, reps=reps)
        _gemm_cache[n] = 2 * n**3 / (t["p50_ms"] * 1e-3) / 1e9
    return _gemm_cache[n]


# ---- environment -------------------------------------------------------------------------------

def _cpuinfo_fields(names: tuple[str, ...]) -> dict[str, str]:
    """The first value of each field in /proc/cpuinfo (empty off Linux)."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in names and key not in found:
                    found[key] = value.strip()
    except OSError:
        pass
    return found


def _cpu_model() -> str:
    info = _cpuinfo_fields(("model name", "vendor_id", "cpu family", "model"))
    name = info.get("model name") or platform.processor() or platform.machine()
    # VMs often report a generic name; family/model identify the part.
    if "cpu family" in info:
        name += f" ({info.get('vendor_id', '?')} family {info['cpu family']} model {info.get('model', '?')})"
    return name


def _cpu_flags() -> list[str]:
    """The SIMD flags that matter for these kernels (from /proc/cpuinfo)."""
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "sve")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    present = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in present]
    except OSError:
        pass
    return []


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> tuple[str | None, bool | None]:
    """(short commit, dirty) of the checkout the benchmark runs from; untracked files do not count."""
    commit = _git("rev-parse", "--short", "HEAD")
    if commit is None:
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit, bool(status)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def environment() -> dict:
    """Machine, versions, commit, date and the settings that change CPU timings."""
    import mmfuse
    from mmfuse import _core
    from mmfuse.ops import _backend
    from mmfuse.runtime import allocator_state

    C = _core.load()
    commit, dirty = git_commit()
    try:
        import psutil
        physical = psutil.cpu_count(logical=False)
        mem_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        physical, mem_gb = None, None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical,
        "usable_cpus": affinity,
        "memory_gib": mem_gb,
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "mmfuse": mmfuse.__version__,
        "mmfuse_path": str(Path(mmfuse.__file__).resolve().parent),
        "mmfuse_cpp_core": C is not None,
        "mmfuse_cpp_error": None if C is not None else _core.error(),
        "mmfuse_active_isa": C.active_isa() if C is not None else None,
        "mmfuse_backend": _backend.requested(),
        "git_commit": commit,
        "git_dirty": dirty,
        "date_utc": utc_now(),
        "allocator": allocator_state(),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }


# ---- results -----------------------------------------------------------------------------------

def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Write `payload` as indented JSON, creating parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_json(path: str | os.PathLike) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
