"""Context parallelism for Qwen2.5-VL: each sample's tokens are split over the cp ranks (zigzag,
cp_sharding.py) and every decoder layer's core attention is swapped for ring (ring_attention.py) or
Ulysses (ulysses.py) attention. The vision tower is split too: each CP rank runs the ViT blocks on a
contiguous 1/cp of the patch rows, and every block's attention is a Ulysses all-to-all over heads
whatever the cp kind (cp_vision.py: non-causal, windowed and short, it needs no ring); the rows are
gathered before the merger, and each rank keeps the vision features of its own tokens.

    apply_context_parallel(model, state.cp_group, layout.cp_kind)
    tf = ContextParallelTransforms(state.cp_group, layout.cp_kind)
    out = stage_forward(model, spec, batch, x_in, tf)   # loss over this rank's tokens

The caller sums loss_sum and num_label_tokens over the CP group and reduces gradients over dp·cp.
"""

from __future__ import annotations

from torch import nn

from mmfuse.parallel.collectives import group_size
from mmfuse.parallel.cp_sharding import ContextParallelTransforms, check_kind
from mmfuse.parallel.cp_vision import VisionUlyssesAttention, check_vision_heads
from mmfuse.parallel.ring_attention import RingAttention
from mmfuse.parallel.ulysses import UlyssesAttention, check_heads

__all__ = ["ContextParallelTransforms", "RingAttention", "UlyssesAttention", "VisionUlyssesAttention",
           "apply_context_parallel"]


def apply_context_parallel(model: nn.Module, cp_group, kind: str = "ring") -> nn.Module:
    """Swap (in place) the core attention of every decoder layer and ViT block this rank holds (layers
    another pipeline stage owns are placeholders without attention) for its context-parallel version."""
    check_kind(kind)
    cp = group_size(cp_group)
    for block in model.visual.blocks:
        attn = getattr(block, "attn", None)
        if attn is None:            # pipeline.keep_only's _Absent placeholder
            continue
        # All heads here (a tensor-parallel split is checked per rank by the layout and the forward).
        check_vision_heads(attn.num_heads, cp)
        attn.core_attention = VisionUlyssesAttention(cp_group)
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
