"""Peak memory of a piece of CPU work, measured two ways: the process's resident set (what the
machine must provide, allocator caching and fragmentation included) and the live tensor bytes
(what PyTorch's CPU allocator hands out). Meant for a fresh process per measurement."""

from __future__ import annotations

import resource
import sys
from typing import Callable


class PeakRss:
    """The process's peak RSS since the last reset, in bytes: VmHWM after `clear_refs` 5 where the
    kernel allows it (Linux >= 4.0), else ru_maxrss (never reset)."""

    def __init__(self):
        self.resettable = False

    def reset(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.resettable = True
        except OSError:
            self.resettable = False

    @staticmethod
    def _status_kib(field: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    def current(self) -> int:
        kib = self._status_kib("VmRSS")
        if kib is None:
            import psutil
            return psutil.Process().memory_info().rss
        return kib * 1024

    @staticmethod
    def maxrss() -> int:
        """ru_maxrss in bytes (reported in KiB on Linux, in bytes on macOS)."""
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024

    def peak(self) -> int:
        kib = self._status_kib("VmHWM") if self.resettable else None
        return self.maxrss() if kib is None else kib * 1024

    @property
    def method(self) -> str:
        return "VmHWM after clear_refs reset" if self.resettable else "ru_maxrss (not resettable)"


def page_in(module) -> int:
    """Read every parameter and buffer once, so weights that a loader left mapped from their file
    (safetensors maps lazily: 217 MiB of the 100m model's 233 MB were paged in only by the first
    step, for mmfuse and transformers alike) are resident before the baseline RSS is taken, and
    the step's growth counts the step's own memory. Returns the bytes read."""
    import torch

    total = 0
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            t.sum()
            total += t.numel() * t.element_size()
    return total


def live_tensor_peak(fn: Callable) -> int:
    """Highest sum of live tensor bytes above the start while `fn` runs, from the CPU allocator's
    events under torch.profiler(profile_memory=True)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak
