"""Activation recompute (gradient checkpointing) as a switch a module reads, so the model code
stays the same with it on or off."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint


def maybe_recompute(enabled: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), storing only args for backward and re-running fn there when `enabled` and autograd
    is recording (non-reentrant checkpoint: works with custom ops, keyword-free, RNG state kept)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
