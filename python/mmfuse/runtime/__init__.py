"""Process-level runtime settings that mmfuse can apply on request (never at import time)."""

from mmfuse.runtime.allocator import allocator_state, tune_allocator

__all__ = ["allocator_state", "tune_allocator"]
