"""Inference: token generation with a key/value cache, prompts built from text, images and videos."""

from mmfuse.infer.generate import Generated, GenerationConfig, generate

__all__ = ["GenerationConfig", "Generated", "generate"]
