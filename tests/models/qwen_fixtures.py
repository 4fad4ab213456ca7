"""Shared builders for the Qwen2.5-VL tests: tiny configs, the transformers twin of a model, and
token streams with image/video spans."""

from __future__ import annotations

import torch

from mmfuse.models.qwen2_5_vl import Qwen2_5_VLConfig


def tiny_config(**text_overrides) -> Qwen2_5_VLConfig:
    cfg = Qwen2_5_VLConfig.preset("tiny")
    for k, v in text_overrides.items():
        setattr(cfg.text, k, v)
    return cfg


def hf_twin(cfg: Qwen2_5_VLConfig, attn: str = "sdpa"):
    """A randomly initialised transformers Qwen2_5_VLForConditionalGeneration of the same shape."""
    import transformers

    hf_cfg = transformers.Qwen2_5_VLConfig.from_dict(cfg.to_hf_dict())
    hf_cfg._attn_implementation = attn
    hf_cfg.text_config._attn_implementation = attn
    hf_cfg.vision_config._attn_implementation = attn
    model = transformers.Qwen2_5_VLForConditionalGeneration(hf_cfg).eval()
    with torch.no_grad():   # HF zero-inits some biases; random values make the comparison meaningful
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name or "ln_q" in name else 0.0))
    return model


def vision_span(cfg: Qwen2_5_VLConfig, grid: tuple[int, int, int], video: bool = False) -> list[int]:
    """<|vision_start|> + pad × (t·h·w / m²) + <|vision_end|> for one image or video."""
    m = cfg.vision.spatial_merge_size
    n = grid[0] * grid[1] * grid[2] // (m * m)
    pad = cfg.video_token_id if video else cfg.image_token_id
    return [cfg.vision_start_token_id] + [pad] * n + [cfg.vision_end_token_id]


def sample(cfg: Qwen2_5_VLConfig, parts: list, gen: torch.Generator) -> list[int]:
    """A token list from parts: an int (that many random text tokens), ('image', grid) or ('video', grid)."""
    ids: list[int] = []
    for part in parts:
        if isinstance(part, int):
            ids += torch.randint(0, cfg.vision_start_token_id - 2, (part,), generator=gen).tolist()
        else:
            ids += vision_span(cfg, part[1], video=part[0] == "video")
    return ids


def mm_token_types(cfg: Qwen2_5_VLConfig, ids: torch.Tensor) -> torch.Tensor:
    """transformers' mm_token_type_ids: 0 text, 1 image pad, 2 video pad."""
    types = torch.zeros_like(ids, dtype=torch.int32)
    types[ids == cfg.image_token_id] = 1
    types[ids == cfg.video_token_id] = 2
    return types


def pixels_for(cfg: Qwen2_5_VLConfig, grids: list[tuple[int, int, int]], gen: torch.Generator) -> torch.Tensor:
    rows = sum(t * h * w for t, h, w in grids)
    return torch.randn(rows, cfg.vision.patch_dim, generator=gen)
