"""Throughput accounting with stated definitions: real (unpadded) tokens, model FLOPs and MFU.

Model FLOPs of a step = 6 · (text parameters without the embedding lookup, with the LM head) · text tokens
                      + 6 · (vision parameters) · image/video patches
                      + attention: 6 · Σ_samples S_i² · H · d per text layer (causal: half of the
                        4·S²·H·d forward, times 3 for forward + backward), and 12 · Σ_windows W² · H · d
                        per vision block (non-causal).
MFU = model FLOPs / (seconds · device peak). Recompute is not counted (it is not model work).
"""

from __future__ import annotations

import resource
import sys

import torch

# Dense bf16 peaks (TFLOP/s) of accelerators we know; CPUs have no single figure, so no MFU there.
KNOWN_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0}


def device_peak_tflops(device: torch.device, configured: float = 0.0) -> float:
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in KNOWN_PEAK_TFLOPS.items():
            if key in name:
                return peak
    return 0.0


def flop_params(model) -> tuple[int, int]:
    """(text, vision) parameter counts that enter the 6·N·tokens terms, from the whole (unsplit) model."""
    text_params = sum(p.numel() for n, p in model.named_parameters()
                      if n.startswith("model.") and "embed_tokens" not in n)
    text_params += model.output_weight.numel()          # the LM head matmul, tied or not
    vision_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("visual."))
    return text_params, vision_params


def step_flops(model, batches: list[dict], params: tuple[int, int] | None = None) -> float:
    """Model FLOPs (forward + backward) of the micro-batches of one step (definition above).
    `params` = flop_params of the whole model, when `model` holds only a part of it."""
    cfg = model.cfg
    t, v = cfg.text, cfg.vision
    text_params, vision_params = params or flop_params(model)
    flops = 0.0
    for b in batches:
        cu = b["cu_seqlens"].long()
        lens = (cu[1:] - cu[:-1]).double()
        flops += 6.0 * text_params * float(lens.sum())
        flops += 6.0 * float((lens ** 2).sum()) * t.num_attention_heads * t.head_dim * t.num_hidden_layers
        for key in ("image_grid_thw", "video_grid_thw"):
            grid = b.get(key)
            if grid is None:
                continue
            patches = float(grid.prod(-1).sum())
            flops += 6.0 * vision_params * patches
            window = (v.window_size // v.patch_size) ** 2
            full_blocks = len(v.fullatt_block_indexes)
            frame = (grid[:, 1] * grid[:, 2]).double()
            frames = grid[:, 0].double()
            flops += 12.0 * v.num_heads * v.head_dim * (
                full_blocks * float((frames * frame ** 2).sum()) + (v.depth - full_blocks) * patches * window)
    return flops


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: the accelerator allocator's peak, or the process's max RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
