"""Answer accuracy on held-out conversations: a sample counts as right when greedy decoding would
reproduce its whole reference answer. With teacher forcing that is exactly "the argmax at every
answer position is the reference token", so one forward pass per packed batch decides it — no
token-by-token generation loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmfuse.data.packing import ProcessedSample, collate
from mmfuse.models.qwen2_5_vl.model import shift_labels


@dataclass
class AnswerAccuracy:
    """Result of `answer_accuracy`."""
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@torch.no_grad()
def answer_accuracy(model, samples: list[ProcessedSample], batch_tokens: int = 4096) -> AnswerAccuracy:
    """Fraction of samples whose labelled tokens are all predicted exactly (greedy exact match)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    correct = 0
    i = 0
    while i < len(samples):
        chunk, tokens = [], 0
        while i < len(samples) and (not chunk or tokens + len(samples[i]) <= batch_tokens):
            chunk.append(samples[i])
            tokens += len(samples[i])
            i += 1
        b = collate(chunk)
        move = lambda t, pix=False: None if t is None else t.to(device, dtype=dtype if pix else None)  # noqa: E731
        out = model(move(b.input_ids), pixel_values=move(b.pixel_values, True), image_grid_thw=b.image_grid_thw,
                    pixel_values_videos=move(b.pixel_values_videos, True), video_grid_thw=b.video_grid_thw,
                    cu_seqlens=move(b.cu_seqlens), return_logits=True)
        target = shift_labels(b.labels, b.cu_seqlens).to(device)
        ok = (out.logits.argmax(-1) == target) | (target == -100)
        cu = b.cu_seqlens.tolist()
        correct += sum(bool(ok[s:e].all()) for s, e in zip(cu[:-1], cu[1:]))
    model.train(was_training)
    return AnswerAccuracy(correct=correct, total=len(samples))
