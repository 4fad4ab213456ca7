"""Small modules over `mmfuse.ops` that every model family uses."""

from __future__ import annotations

import torch
from torch import nn

from mmfuse import ops


class RMSNorm(nn.Module):
    """HF-compatible RMSNorm (`weight * normalise(x).to(x.dtype)`, fp32 statistics) on the fused op."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
