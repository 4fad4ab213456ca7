"""Data: the MLLM sample format, converters, Qwen2-VL image/video processing, chat templates,
tokenisation, label masking and packing into varlen micro-batches."""
