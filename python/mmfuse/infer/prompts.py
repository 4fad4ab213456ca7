"""Prompts for generation: conversations (MLLM samples, or a question with images typed on the
command line) through the same media decoding, image processor and chat template as training, up to
the assistant header of the answer to generate."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmfuse.data.config import DataConfig
from mmfuse.data.dataset import ImageProcessor, process_media
from mmfuse.data.mllm import IMAGE_TAG, VIDEO_TAG, Message, MLLMSample
from mmfuse.data.packing import ProcessedSample
from mmfuse.data.report import SampleError
from mmfuse.data.template import Qwen2VLTemplate


@dataclass
class Prompt:
    """A processed prompt and, when the conversation came with one, its reference answer."""
    sample: ProcessedSample
    reference: str | None = None


def question_sample(question: str, images: list[str] | None = None, videos: list[str] | None = None,
                    system: str | None = None, source: str = "<question>", index: int = 0) -> MLLMSample:
    """One user turn. Media with no <image>/<video> tag in the question are placed before its text
    (one tag per file, images first), the way a chat UI sends an attachment."""
    images, videos = list(images or []), list(videos or [])
    n_img, n_vid = question.count(IMAGE_TAG), question.count(VIDEO_TAG)
    if n_img == 0 and n_vid == 0:
        question = IMAGE_TAG * len(images) + VIDEO_TAG * len(videos) + question
    elif (n_img, n_vid) != (len(images), len(videos)):
        raise ValueError(f"the question has {n_img} {IMAGE_TAG} and {n_vid} {VIDEO_TAG} tags for {len(images)} "
                         f"image and {len(videos)} video files: give one file per tag, or no tags at all")
    return MLLMSample(messages=[Message("user", question)], images=images, videos=videos, system=system,
                      source=source, index=index)


def build_prompt(sample: MLLMSample, config: DataConfig, template: Qwen2VLTemplate,
                 processor: ImageProcessor) -> Prompt:
    """The prompt of a conversation. One that ends with an assistant turn (an MLLM training or test
    sample) is asked for that last answer, which becomes the reference; one that ends with a user
    turn is asked for the next answer. SampleError (naming the sample) when it cannot be used."""
    messages, reference = list(sample.messages), None
    if messages and messages[-1].role == "assistant":
        reference = messages.pop().content
    roles = [m.role for m in messages]
    if not roles or roles != ["user" if i % 2 == 0 else "assistant" for i in range(len(roles))]:
        raise SampleError("bad_roles", f"a prompt is user, assistant, ..., user turns; got {roles}", where=sample.where)
    try:
        media = process_media(sample, config, processor)
        ids = template.encode_prompt(messages, sample.system, image_grid_thw=media.get("image_grid_thw"),
                                     video_grid_thw=media.get("video_grid_thw"))
    except SampleError as exc:
        raise SampleError(exc.reason, exc.detail, where=sample.where) from exc
    input_ids = torch.tensor(ids, dtype=torch.int64)
    processed = ProcessedSample(
        input_ids=input_ids, labels=torch.full_like(input_ids, -100),
        pixel_values=media.get("pixel_values"), image_grid_thw=media.get("image_grid_thw"),
        pixel_values_videos=media.get("pixel_values_videos"), video_grid_thw=media.get("video_grid_thw"),
        second_per_grid_ts=media.get("second_per_grid_ts"), where=sample.where)
    return Prompt(processed, reference)
