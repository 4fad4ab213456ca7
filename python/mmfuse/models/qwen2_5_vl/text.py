"""The Qwen2 decoder of Qwen2.5-VL on mmfuse ops: packed token streams ([T, ...], no batch axis),
causal varlen attention per sample (`cu_seqlens`), GQA, M-RoPE with angles computed in the kernel.

Shape legend: T tokens in the packed stream, D model width, H/Hk query/key-value heads, d head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from mmfuse import ops
from mmfuse.models.common.kv_cache import LayerKVCache
from mmfuse.models.common.layers import CoreAttention, Embedding, RMSNorm
from mmfuse.models.common.recompute import maybe_recompute
from mmfuse.models.qwen2_5_vl.config import TextConfig


def mrope_inv_freq(cfg: TextConfig) -> torch.Tensor:
    """inv_freq [d/2] exactly as HF computes it (fp32 arange / dim, then base ** x)."""
    dim = cfg.head_dim
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))


class TextAttention(nn.Module):
    """GQA self-attention with q/k/v bias and M-RoPE; causal within each packed sample."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.mrope_section = list(cfg.mrope_section)
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.core_attention = CoreAttention(causal=True)
        self.recompute_core_attention = False  # selective recompute: re-run only attention in backward

    def forward(self, x_TD: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
                cu_seqlens: torch.Tensor, max_seqlen: int, kv_cache: LayerKVCache | None = None) -> torch.Tensor:
        # Head counts from the projections' widths, so a tensor-parallel plan that splits the
        # projections by heads needs no change here.
        q_THd = self.q_proj(x_TD).unflatten(-1, (-1, self.head_dim))
        k_TKd = self.k_proj(x_TD).unflatten(-1, (-1, self.head_dim))
        v_TKd = self.v_proj(x_TD).unflatten(-1, (-1, self.head_dim))
        q_THd, k_TKd = ops.apply_mrope(q_THd, k_TKd, position_ids, inv_freq, self.mrope_section)
        if kv_cache is not None:   # generation: the new tokens attend to their sequences' cached ones too
            return self.o_proj(kv_cache.attend(q_THd, k_TKd, v_TKd, cu_seqlens).flatten(1))
        out_THd = maybe_recompute(self.recompute_core_attention, self.core_attention, q_THd, k_TKd, v_TKd,
                                  cu_seqlens, max_seqlen)
        return self.o_proj(out_THd.flatten(1))


class TextMLP(nn.Module):
    """SwiGLU MLP without biases."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = TextAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = TextMLP(cfg)

    def forward(self, x_TD, position_ids, inv_freq, cu_seqlens, max_seqlen: int,
                kv_cache: LayerKVCache | None = None):
        h = x_TD + self.self_attn(self.input_layernorm(x_TD), position_ids, inv_freq, cu_seqlens, max_seqlen,
                                  kv_cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class TextModel(nn.Module):
    """Embeddings, decoder layers and the final norm (HF's `model.*` / `model.language_model.*`)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Not a buffer: `model.to(bfloat16)` would round it, and the kernel wants the fp32 values.
        self._inv_freq = mrope_inv_freq(cfg)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if self._inv_freq.device != device:
            self._inv_freq = self._inv_freq.to(device)
        return self._inv_freq
