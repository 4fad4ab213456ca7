"""Context parallelism for the Qwen2.5-VL text decoder: each sample's tokens are split over the cp
ranks (zigzag, cp_sharding.py) and every decoder layer's core attention is swapped for ring
(ring_attention.py) or Ulysses (ulysses.py) attention. The vision tower is not split: it runs whole
on every CP rank, and each rank keeps the vision features of its own tokens.

    apply_context_parallel(model, state.cp_group, layout.cp_kind)
    tf = ContextParallelTransforms(state.cp_group, layout.cp_kind)
    out = stage_forward(model, spec, batch, x_in, tf)   # loss over this rank's tokens

The caller sums loss_sum and num_label_tokens over the CP group and reduces gradients over dp·cp.
"""

from __future__ import annotations

from torch import nn

from mmfuse.parallel.collectives import group_size
from mmfuse.parallel.cp_sharding import ContextParallelTransforms, check_kind
from mmfuse.parallel.ring_attention import RingAttention
from mmfuse.parallel.ulysses import UlyssesAttention, check_heads

__all__ = ["ContextParallelTransforms", "RingAttention", "UlyssesAttention", "apply_context_parallel"]


def apply_context_parallel(model: nn.Module, cp_group, kind: str = "ring") -> nn.Module:
    """Swap (in place) the core attention of every decoder layer this rank holds (layers another
    pipeline stage owns are placeholders without attention) for its context-parallel version."""
    check_kind(kind)
    cp = group_size(cp_group)
    for layer in model.model.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None:            # pipeline.keep_only's _Absent placeholder
            continue
        causal = attn.core_attention.causal
        if kind == "ulysses":
            # Heads from the projection width, so a tensor-parallel split applied first is respected.
            check_heads(attn.q_proj.out_features // attn.head_dim, cp)
            attn.core_attention = UlyssesAttention(cp_group, causal)
        else:
            attn.core_attention = RingAttention(cp_group, causal)
    return model
