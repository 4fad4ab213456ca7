"""Small modules over `mmfuse.ops` that every model family uses."""

from __future__ import annotations

import torch
from torch import nn

from mmfuse import ops


class Embedding(nn.Embedding):
    """nn.Embedding whose constructor leaves a meta-device weight as it is. nn.Embedding draws N(0, 1)
    into its weight on construction. On the meta device (from_pretrained builds the model there) that
    `normal_` runs through torch._refs, whose import pulls in torch._dynamo: 3-4 s on the 2-core CPU
    machine, once per process, a fifth of `mmfuse demo` and part of every `mmfuse train` start and
    every spawned rank. A meta weight is filled by the loader, and the model's init_weights draws the
    weights it keeps anyway."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


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


class CoreAttention(nn.Module):
    """softmax(q kᵀ) v over packed samples (`cu_seqlens`), with no parameters: the piece a context
    parallel plan replaces (ring / Ulysses) and selective recompute re-runs. q [T, H, d], k/v [T, Hk, d]."""

    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int) -> torch.Tensor:
        return ops.attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=self.causal)

    def extra_repr(self) -> str:
        return f"causal={self.causal}"


class LinearCrossEntropyLoss(nn.Module):
    """Summed next-token loss of hidden [N, D] against the LM head weight [V, D], never holding N x V
    logits (the fused op). A parameterless module so a tensor-parallel plan can swap in the
    vocab-parallel version."""

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                ignore_index: int = -100) -> torch.Tensor:
        return ops.linear_cross_entropy(hidden, weight, target, ignore_index=ignore_index, reduction="sum")
