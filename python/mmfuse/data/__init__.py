"""Data: the MLLM sample format, converters, Qwen2-VL image/video processing, chat templates,
tokenisation, label masking and packing into varlen micro-batches."""

from mmfuse.data.image_processor import Qwen2VLImageProcessor, num_image_tokens, smart_resize

__all__ = ["Qwen2VLImageProcessor", "num_image_tokens", "smart_resize"]
