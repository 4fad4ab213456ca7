"""The Qwen2.5-VL vision tower (ViT with 2-D RoPE, window and full attention, SwiGLU blocks, 2x2
patch merger) on mmfuse ops. Computes what transformers' `Qwen2_5_VisionTransformerPretrainedModel`
computes (its `pooler_output`); module names equal the checkpoints' `visual.*` names, except that
the patch embedding is a Linear over the flattened patch (see `patch_embed_weight_from_hf`).

Shape legend: T patches (packed over images and frames), G merge groups (T / m²), D hidden size,
M = m²·D (a group's patches side by side), H heads, Dh head dim, P flattened patch
(channels x frames x patch x patch), O out_hidden_size, C any width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmfuse import ops
from mmfuse.models.common.layers import CoreAttention, RMSNorm
from mmfuse.models.common.recompute import RecomputeConfig, maybe_recompute, run_layers
from mmfuse.models.qwen2_5_vl.config import VisionConfig
from mmfuse.models.qwen2_5_vl.vision_windows import vision_windows


def patch_embed_weight_from_hf(w: torch.Tensor) -> torch.Tensor:
    """HF's Conv3d weight [D, C, Tp, P, P] as our Linear weight [D, C*Tp*P*P]. Exact: the
    convolution's stride equals its kernel, and the processor flattens each patch row as (C, Tp, P, P)."""
    return w.reshape(w.shape[0], -1)


def patch_embed_weight_to_hf(w: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    """Our Linear weight [D, P] back to HF's Conv3d weight [D, C, Tp, P, P]."""
    return w.reshape(w.shape[0], cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.patch_dim, cfg.hidden_size, bias=False)

    def forward(self, pixel_values_TP: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values_TP.to(self.proj.weight.dtype))


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.core_attention = CoreAttention(causal=False)
        # Selective recompute: keep only q, k, v for backward and rerun the attention kernel there.
        self.recompute_core_attention = False

    def forward(self, x_TD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int) -> torch.Tensor:
        # Head count and length from qkv's output, not from x: a tensor-parallel plan gives each rank
        # [q_r; k_r; v_r] rows of the fused qkv, and under sequence parallelism it gathers the tokens.
        qkv = self.qkv(x_TD)
        T = qkv.shape[0]
        q_THDh, k_THDh, v_THDh = qkv.view(T, 3, qkv.shape[-1] // (3 * self.head_dim), self.head_dim).unbind(1)
        q_THDh, k_THDh = ops.rotary(q_THDh, cos, sin), ops.rotary(k_THDh, cos, sin)
        out_THDh = maybe_recompute(self.recompute_core_attention, self.core_attention,
                                   q_THDh, k_THDh, v_THDh, cu_seqlens, max_seqlen)
        return self.proj(out_THDh.flatten(1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, full_attention: bool = False):
        super().__init__()
        self.full_attention = full_attention  # attends over whole frames, else within 112 px windows
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x_TD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int) -> torch.Tensor:
        x_TD = x_TD + self.attn(self.norm1(x_TD), cos, sin, cu_seqlens, max_seqlen)
        return x_TD + self.mlp(self.norm2(x_TD))


class PatchMerger(nn.Module):
    """RMSNorm, then each merge group's m² patches concatenated and mapped by a GELU MLP to one token."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        merged = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, cfg.out_hidden_size))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        x_GM = self.ln_q(x_TD).view(-1, self.mlp[0].in_features)
        return self.mlp(x_GM)


@dataclass
class VisionInputs:
    """What every block of one forward needs besides the hidden states (in window order)."""
    cos: torch.Tensor                 # [T, Dh/2] rotary angles of each patch
    sin: torch.Tensor
    windows: Any                      # vision_windows(...): permutation, window and frame cu_seqlens


class VisionTransformer(nn.Module):
    """pixel_values [T, P] (the processor's rows) and grid_thw [n, 3] -> merged tokens [T / m², O],
    images and frames concatenated in grid_thw's order, groups in the processor's order.

    forward = prepare (patch embedding, window permutation) → run_blocks → merge; the three parts
    are public so a pipeline plan can place blocks on different stages."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        full = frozenset(cfg.fullatt_block_indexes)
        self.blocks = nn.ModuleList(VisionBlock(cfg, full_attention=i in full) for i in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        self.recompute: RecomputeConfig | None = None   # full-recompute policy for the blocks (set by the model)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        ctx = self.inputs(pixel_values, grid_thw)
        x_TD = self.embed(pixel_values, ctx)
        x_TD = self.run_blocks(x_TD, ctx, self.blocks)
        return self.merge(x_TD, ctx)

    def inputs(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> VisionInputs:
        """Rotary angles and windows for a batch of images/frames (no parameters involved)."""
        grid = check_vision_inputs(pixel_values, grid_thw, self.cfg).to(pixel_values.device)
        cfg, unit = self.cfg, self.cfg.spatial_merge_size ** 2
        win = vision_windows(grid, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size)
        cos, sin = ops.vision_rope_cos_sin(grid, cfg.head_dim, cfg.spatial_merge_size, cfg.rope_theta)
        cos, sin = (_by_group(t, win.window_index, unit) for t in (cos, sin))
        return VisionInputs(cos, sin, win)

    def embed(self, pixel_values: torch.Tensor, ctx: VisionInputs) -> torch.Tensor:
        """Patch embeddings in window order. One permutation for the whole stack; full-attention
        blocks see frames as contiguous runs of it too, so nothing is permuted between blocks."""
        return _by_group(self.patch_embed(pixel_values), ctx.windows.window_index, self.cfg.spatial_merge_size ** 2)

    def run_blocks(self, x_TD: torch.Tensor, ctx: VisionInputs, blocks) -> torch.Tensor:
        win = ctx.windows

        def block_call(block, h):
            if block.full_attention:
                return block(h, ctx.cos, ctx.sin, win.cu_seqlens, win.max_seqlen)
            return block(h, ctx.cos, ctx.sin, win.cu_window_seqlens, win.max_window_seqlen)

        return run_layers(blocks, x_TD, self.recompute, block_call)

    def merge(self, x_TD: torch.Tensor, ctx: VisionInputs) -> torch.Tensor:
        """Patch merger, then back to the processor's group order."""
        return self.merger(x_TD)[ctx.windows.reverse_index]


def _by_group(x_TC: torch.Tensor, index: torch.Tensor, unit: int) -> torch.Tensor:
    """Rows of x reordered by merge group (unit consecutive rows each) as index says."""
    return x_TC.reshape(-1, unit, x_TC.shape[-1])[index].view(x_TC.shape)


def check_vision_inputs(pixel_values: torch.Tensor, grid_thw: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    """grid_thw as int64 [n, 3] on the CPU, or a ValueError naming what does not fit."""
    grid = torch.as_tensor(grid_thw)
    if grid.dtype.is_floating_point or grid.dtype.is_complex or grid.dtype == torch.bool:
        raise ValueError(f"vision tower: grid_thw must hold integers, got {grid.dtype}")
    if grid.dim() != 2 or grid.shape[1] != 3:
        raise ValueError(f"vision tower: grid_thw must be [n_images, 3] (t, h, w), got shape {tuple(grid.shape)}")
    grid = grid.to("cpu", torch.int64)
    m = cfg.spatial_merge_size
    if (grid < 0).any() or (grid[:, 1:] % m).any():
        raise ValueError(f"vision tower: grid_thw entries must be >= 0 with h and w divisible by "
                         f"spatial_merge_size = {m}, got {grid.tolist()}")
    if pixel_values.dim() != 2 or pixel_values.shape[1] != cfg.patch_dim:
        raise ValueError(f"vision tower: pixel_values must be [n_patches, patch_dim = {cfg.patch_dim}] "
                         f"(channels x temporal_patch_size x patch_size²), got shape {tuple(pixel_values.shape)}")
    n = int(grid.prod(-1).sum())
    if pixel_values.shape[0] != n:
        raise ValueError(f"vision tower: pixel_values has {pixel_values.shape[0]} patch rows but grid_thw "
                         f"{grid.tolist()} describes {n}")
    return grid
