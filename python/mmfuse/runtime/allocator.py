"""glibc malloc tuning for large, short-lived CPU tensors.

By default glibc serves every allocation above M_MMAP_THRESHOLD (128 KiB, adapted upwards up to
32 MiB) with a fresh mmap and returns it to the kernel on free. A training step allocates and frees
the same activation-sized tensors over and over, so each one is page-faulted and zeroed by the
kernel again: on the 2-core build VMs a write into a freshly allocated 64 MiB tensor took 25-59 ms,
and 8-24 ms once the thresholds were raised and the freed block was handed out again.

`tune_allocator()` raises M_MMAP_THRESHOLD and M_TRIM_THRESHOLD with `mallopt` in this process so
freed blocks stay in malloc's heap and are handed out again without new page faults. It is the
in-process equivalent of `MALLOC_MMAP_THRESHOLD_=<n> MALLOC_TRIM_THRESHOLD_=<n>` in the environment,
which only takes effect if set before the process starts.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# mallopt takes a C int.
_INT_MAX = 2**31 - 1

_ENV_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "MALLOC_TOP_PAD_",
             "GLIBC_TUNABLES", "LD_PRELOAD", "THP_MEM_ALLOC_ENABLE")

_applied: dict | None = None  # what tune_allocator set, for allocator_state()


def _glibc_version() -> str | None:
    if not sys.platform.startswith("linux"):
        return None
    name, version = platform.libc_ver()
    return version if name == "glibc" else None


def _mallopt():
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def tune_allocator(retain_bytes: int = 1 << 30) -> bool:
    """Keep freed blocks of up to `retain_bytes` in glibc's heap for reuse. Returns True when set.

    Sets M_MMAP_THRESHOLD (blocks below it come from the heap instead of a private mmap) and
    M_TRIM_THRESHOLD (free memory at the top of the heap is returned to the kernel only above it)
    to `retain_bytes`. Idempotent: a second call with the same value changes nothing.

    Trade-off: memory freed by PyTorch is no longer given back to the operating system, so the
    process's RSS stays near its peak until exit, and heap fragmentation can keep more than the live
    tensors resident. Worth it for a long-running training or benchmark process whose step reuses
    the same tensor sizes; not for a process that must shrink after a peak.

    Does nothing and returns False on platforms without glibc (macOS, Windows, musl) or when
    glibc rejects a value. Call it explicitly, early in the process (before the first large
    allocation); importing mmfuse never changes the allocator.
    """
    global _applied
    if not isinstance(retain_bytes, int) or not 0 < retain_bytes <= _INT_MAX:
        raise ValueError(f"tune_allocator: retain_bytes must be an int in (0, {_INT_MAX}], got {retain_bytes!r}")
    if _glibc_version() is None:
        return False
    if _applied is not None and _applied["retain_bytes"] == retain_bytes:
        return _applied["ok"]
    mallopt = _mallopt()
    if mallopt is None:
        return False
    mmap_ok = mallopt(M_MMAP_THRESHOLD, retain_bytes) == 1
    trim_ok = mallopt(M_TRIM_THRESHOLD, retain_bytes) == 1
    _applied = {"retain_bytes": retain_bytes, "mmap_threshold_set": mmap_ok, "trim_threshold_set": trim_ok,
                "ok": mmap_ok and trim_ok}
    return _applied["ok"]


def is_tuned() -> bool:
    """Whether tune_allocator() took effect in this process."""
    return bool(_applied and _applied["ok"])


def allocator_state() -> dict:
    """What governs CPU allocation in this process, for benchmark and bug reports."""
    glibc = _glibc_version()
    thp = None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read().strip()
    except OSError:
        pass
    return {
        "glibc": glibc,
        "tuned": bool(_applied and _applied["ok"]),
        "mallopt": dict(_applied) if _applied else None,
        "env": {k: os.environ[k] for k in _ENV_VARS if k in os.environ},
        "transparent_hugepage": thp,
    }
