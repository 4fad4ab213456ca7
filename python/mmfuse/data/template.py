"""The `qwen2vl` chat template as MindSpeed-MM uses it (LLaMA-Factory's `qwen2_vl`): layout, image
and video placeholder expansion, label masking and truncation.

    <|im_start|>system\\n{system}<|im_end|>\\n                   (first turn only; default system prompt)
    <|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n  (prompt: label -100 unless train_on_prompt)
    {assistant}<|im_end|>\\n                                       (response: trained)

Each `<image>` becomes <|vision_start|> + n x <|image_pad|> + <|vision_end|> with n = t*h*w / merge^2
from the image's grid (same for `<video>` with <|video_pad|>). Labels are not shifted."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from mmfuse.data.mllm import IMAGE_TAG, VIDEO_TAG, Message
from mmfuse.data.report import SampleError
from mmfuse.data.tokenizer import Tokenizer

IGNORE_INDEX = -100
DEFAULT_SYSTEM = "You are a helpful assistant."
TEMPLATE_NAMES = ("qwen2vl", "qwen2_vl")   # MindSpeed-MM's name and LLaMA-Factory's
_TAG_SPLIT = re.compile(f"({re.escape(IMAGE_TAG)}|{re.escape(VIDEO_TAG)})")


@dataclass
class EncodedSample:
    """Token ids of one conversation, ready for packing."""
    input_ids: list[int]     # [T]
    labels: list[int]        # [T], IGNORE_INDEX where no loss; aligned with input_ids (the model shifts)
    n_image_tokens: int      # <|image_pad|> ids in input_ids (= sum over images of t*h*w / merge^2)
    n_video_tokens: int      # <|video_pad|> ids in input_ids


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LLaMA-Factory's split of a token budget between a turn's prompt and its response: keep the
    response whole when it is short, else the prompt, else share in proportion."""
    if target_len * 2 < cutoff_len:
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target_len = cutoff_len - source_len
    else:
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
    return new_source_len, new_target_len


def _grid_tokens(grids, merge_size: int, kind: str) -> list[int]:
    counts = []
    for g in ([] if grids is None else grids):
        t, h, w = (int(x) for x in g)
        if (h % merge_size) or (w % merge_size):
            raise SampleError(f"bad_{kind}_grid", f"{kind} grid {(t, h, w)} is not a multiple of merge size "
                                                  f"{merge_size} in h and w")
        counts.append(t * h * w // (merge_size * merge_size))
    return counts


class Qwen2VLTemplate:
    """Renders and tokenises conversations in the Qwen2-VL chat layout."""

    name = "qwen2vl"

    def __init__(self, tokenizer: Tokenizer, merge_size: int = 2, default_system: str = DEFAULT_SYSTEM):
        self.tokenizer = tokenizer
        self.merge_size = merge_size
        self.default_system = default_system
        # KeyError naming the token and the tokenizer file when one is missing: fail at start-up.
        self.vision_start = tokenizer.token_id("<|vision_start|>")
        self.vision_end = tokenizer.token_id("<|vision_end|>")
        self.image_pad = tokenizer.token_id("<|image_pad|>")
        self.video_pad = tokenizer.token_id("<|video_pad|>")
        self.im_end = tokenizer.token_id("<|im_end|>")

    # ---- text -> ids ---------------------------------------------------------------------------

    def _encode_text(self, text: str, media: list[list[int]]) -> list[int]:
        """Tokenise `text`, replacing each <image>/<video> tag by the next placeholder run in `media`.
        Splitting at the tags tokenises the same as LLaMA-Factory's string substitution, because its
        <|vision_start|>/<|vision_end|> special tokens cut the text at the same places."""
        ids: list[int] = []
        for piece in _TAG_SPLIT.split(text):
            if piece in (IMAGE_TAG, VIDEO_TAG):
                ids += media.pop(0)
            elif piece:
                ids += self.tokenizer.encode(piece)
        return ids

    def _media_runs(self, messages: Sequence[Message], image_grid_thw, video_grid_thw) -> list[list[int]]:
        """Placeholder runs in the order their tags appear in the conversation."""
        images = _grid_tokens(image_grid_thw, self.merge_size, "image")
        videos = _grid_tokens(video_grid_thw, self.merge_size, "video")
        text = "".join(m.content for m in messages)
        tags = _TAG_SPLIT.findall(text)
        n_img, n_vid = tags.count(IMAGE_TAG), tags.count(VIDEO_TAG)
        if n_img != len(images):
            raise SampleError("image_tag_mismatch", f"{n_img} {IMAGE_TAG} tags for {len(images)} image grids")
        if n_vid != len(videos):
            raise SampleError("video_tag_mismatch", f"{n_vid} {VIDEO_TAG} tags for {len(videos)} video grids")
        runs = []
        for tag in tags:
            n, pad = (images.pop(0), self.image_pad) if tag == IMAGE_TAG else (videos.pop(0), self.video_pad)
            runs.append([self.vision_start] + [pad] * n + [self.vision_end])
        return runs

    def encode_pairs(self, messages: Sequence[Message], system: str | None = None, image_grid_thw=None,
                     video_grid_thw=None) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, response ids) per user/assistant turn; the first prompt carries the system block."""
        runs = self._media_runs(messages, image_grid_thw, video_grid_thw)
        pairs = []
        for i in range(0, len(messages) - 1, 2):
            user, assistant = messages[i], messages[i + 1]
            prompt = ""
            if i == 0:
                # `or`: an empty system prompt falls back to the default, as in LLaMA-Factory.
                prompt = f"<|im_start|>system\n{system or self.default_system}<|im_end|>\n"
            prompt += f"<|im_start|>user\n{user.content}<|im_end|>\n<|im_start|>assistant\n"
            if i == 0 and _TAG_SPLIT.search(system or ""):
                # Tags in the system prompt are plain text: keep them out of the media substitution.
                head = f"<|im_start|>system\n{system}<|im_end|>\n"
                prompt_ids = self.tokenizer.encode(head) + self._encode_text(prompt[len(head):], runs)
            else:
                prompt_ids = self._encode_text(prompt, runs)
            pairs.append((prompt_ids, self._encode_text(f"{assistant.content}<|im_end|>\n", runs)))
        return pairs

    def encode(self, messages: Sequence[Message], system: str | None = None, image_grid_thw=None,
               video_grid_thw=None, cutoff_len: int | None = None, train_on_prompt: bool = False,
               mask_history: bool = False) -> EncodedSample:
        """Token ids and labels of a whole conversation (LLaMA-Factory's supervised encoding).
        Prompts get IGNORE_INDEX labels unless `train_on_prompt`; with `mask_history` only the last
        answer is trained and truncation drops the oldest turns first. Truncation to `cutoff_len`
        follows infer_seqlen per turn, but a sample whose image/video placeholder runs would not all
        survive whole raises SampleError("media_truncated"), since its pixels would no longer match
        its tokens; a sample left with no trained token raises SampleError("no_trainable_tokens")."""
        pairs = self.encode_pairs(messages, system, image_grid_thw, video_grid_thw)
        if mask_history:
            pairs = pairs[::-1]    # the last turn first: it gets the budget and the loss
        input_ids: list[int] = []
        labels: list[int] = []
        total = 0
        for turn, (source, target) in enumerate(pairs):
            if cutoff_len is not None:
                if total >= cutoff_len:
                    break
                source_len, target_len = infer_seqlen(len(source), len(target), cutoff_len - total)
                source, target = source[:source_len], target[:target_len]
            total += len(source) + len(target)
            source_labels = list(source) if train_on_prompt else [IGNORE_INDEX] * len(source)
            target_labels = [IGNORE_INDEX] * len(target) if (mask_history and turn != 0) else list(target)
            if mask_history:
                input_ids = source + target + input_ids
                labels = source_labels + target_labels + labels
            else:
                input_ids += source + target
                labels += source_labels + target_labels
        n_img = sum(_grid_tokens(image_grid_thw, self.merge_size, "image"))
        n_vid = sum(_grid_tokens(video_grid_thw, self.merge_size, "video"))
        kept_img, kept_vid = input_ids.count(self.image_pad), input_ids.count(self.video_pad)
        if (kept_img, kept_vid) != (n_img, n_vid):
            raise SampleError("media_truncated",
                              f"cutoff_len {cutoff_len} keeps {kept_img}/{n_img} image and {kept_vid}/{n_vid} "
                              f"video tokens; raise cutoff_len (seq_length) or lower image_max_pixels")
        if all(label == IGNORE_INDEX for label in labels):
            raise SampleError("no_trainable_tokens", f"no answer token survives cutoff_len {cutoff_len}")
        return EncodedSample(input_ids, labels, n_img, n_vid)

    def encode_prompt(self, messages: Sequence[Message], system: str | None = None, image_grid_thw=None,
                      video_grid_thw=None) -> list[int]:
        """Ids of a conversation that ends with a user turn, followed by the assistant header: the
        input for generating the next answer."""
        if len(messages) % 2 != 1:
            raise ValueError("encode_prompt expects user, assistant, ..., user (an odd number of messages)")
        pairs = self.encode_pairs(list(messages) + [Message("assistant", "")], system, image_grid_thw,
                                  video_grid_thw)
        ids = [t for source, target in pairs[:-1] for t in source + target]
        return ids + pairs[-1][0]


def get_template(name: str, tokenizer: Tokenizer, merge_size: int = 2) -> Qwen2VLTemplate:
    """The template called `name` (data.json `template`)."""
    if name not in TEMPLATE_NAMES:
        raise ValueError(f"template {name!r} is not supported; use one of {list(TEMPLATE_NAMES)}")
    return Qwen2VLTemplate(tokenizer, merge_size=merge_size)
