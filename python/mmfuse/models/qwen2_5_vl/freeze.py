"""Freezing by module group, with MindSpeed-MM's three groups for Qwen2.5-VL."""

from __future__ import annotations

from torch import nn

# group -> module-name prefixes (the model's own names; also those of the HF checkpoints)
MODULE_GROUPS = {
    "vision_encoder": ("visual.patch_embed", "visual.blocks"),
    "projector": ("visual.merger",),
    "text_decoder": ("model.", "lm_head"),
}


def freeze(model: nn.Module, groups: list[str] | tuple[str, ...]) -> int:
    """Set requires_grad=False on every parameter of the named groups; returns how many tensors.
    Unknown group names raise ValueError listing the known ones."""
    unknown = [g for g in groups if g not in MODULE_GROUPS]
    if unknown:
        raise ValueError(f"unknown module groups {unknown}; choose from {sorted(MODULE_GROUPS)}")
    prefixes = tuple(p for g in groups for p in MODULE_GROUPS[g])
    n = 0
    for name, p in model.named_parameters():
        if name.startswith(prefixes):
            p.requires_grad_(False)
            n += 1
    return n
