"""Qwen2.5-VL: vision tower, patch merger and M-RoPE decoder on mmfuse ops (see model.py)."""

from mmfuse.models.qwen2_5_vl.config import Qwen2_5_VLConfig, TextConfig, VisionConfig
from mmfuse.models.qwen2_5_vl.model import CausalLMOutput, Qwen2_5_VL

__all__ = ["Qwen2_5_VL", "Qwen2_5_VLConfig", "TextConfig", "VisionConfig", "CausalLMOutput"]
