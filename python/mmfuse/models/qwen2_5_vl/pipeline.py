"""Qwen2.5-VL as a chain of pipeline stages, and the forward of one stage.

The model in pipeline order is one chain of units:

    patch_embed, vit blocks 0..n-1, merger | embed (tokens + vision placement), decoder layers 0..m-1, head

A (virtual) stage owns `vit[v]` blocks and `llm[v]` layers (MindSpeed-MM's vit_pp_layers /
llm_pp_layers); patch_embed goes with the first ViT block, the merger with the last, the token
embedding with the first decoder layer and norm + loss with the last stage. Between stages flows one
tensor: ViT hidden states (window order), merged vision features, or decoder hidden states. The
rest of a micro-batch (ids, grids, positions, targets) every stage derives from the batch itself.

Images and videos go through the vision tower as one stream (attention never crosses a frame or
window, so this equals two separate calls) and are split again after the merger.

`transforms` (default: none) is where context and sequence parallelism enter: padding the batch,
sharding tokens after the embedding and the decoder inputs to match, gathering before the head;
for the vision tower, padding its stream (an extra all-zero image, dropped after the merger),
sharding the patch embeddings, cutting the blocks' per-row inputs (rotary tables) to the rows
their attention sees, and gathering the rows before the merger.
With one stage and no transforms, `stage_forward` computes exactly `model(**batch)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from mmfuse.models.qwen2_5_vl.model import CausalLMOutput, DecoderInputs, Qwen2_5_VL
from mmfuse.models.qwen2_5_vl.vision import VisionInputs


@dataclass(frozen=True)
class StageSpec:
    """What one (virtual) stage computes: ViT blocks [vit_start, vit_end), decoder layers
    [llm_start, llm_end), and which boundary units it owns."""
    index: int                  # virtual stage (pipeline order)
    vit_start: int
    vit_end: int
    llm_start: int
    llm_end: int
    patch_embed: bool           # starts the ViT
    merger: bool                # ends the ViT (merger, split into image/video features)
    embed: bool                 # token embeddings + vision placement
    head: bool                  # final norm + loss (the last stage)

    @property
    def first(self) -> bool:
        return self.index == 0


def stage_specs(vit: list[int], llm: list[int]) -> list[StageSpec]:
    """Specs of all virtual stages from per-stage ViT/decoder layer counts (already validated)."""
    n = len(vit)
    first_vit = next(i for i, c in enumerate(vit) if c) if any(vit) else 0
    last_vit = max((i for i, c in enumerate(vit) if c), default=0)
    first_llm = next((i for i, c in enumerate(llm) if c), n - 1)
    specs, v0, l0 = [], 0, 0
    for i in range(n):
        specs.append(StageSpec(i, v0, v0 + vit[i], l0, l0 + llm[i], patch_embed=i == first_vit,
                               merger=i == last_vit, embed=i == first_llm, head=i == n - 1))
        v0, l0 = v0 + vit[i], l0 + llm[i]
    return specs


class Transforms(Protocol):
    """Context/sequence parallel steps a stage runs at fixed points (identity when not parallel)."""
    def pad_batch(self, batch: dict[str, Any]) -> dict[str, Any]: ...
    def local_inputs(self, inp: DecoderInputs) -> DecoderInputs: ...
    def shard_hidden(self, hidden_TD: torch.Tensor, inp: DecoderInputs) -> torch.Tensor: ...
    def gather_for_head(self, hidden_TD: torch.Tensor) -> torch.Tensor: ...
    def pad_vision(self, pixels_TP: torch.Tensor, grid_thw: torch.Tensor, merge: int
                   ) -> tuple[torch.Tensor, torch.Tensor]: ...
    def shard_vision(self, x_TD: torch.Tensor) -> torch.Tensor: ...
    def local_vision_inputs(self, ctx: VisionInputs) -> VisionInputs: ...
    def gather_vision(self, x_TD: torch.Tensor) -> torch.Tensor: ...


class NoTransforms:
    def pad_batch(self, batch):
        return batch

    def local_inputs(self, inp):
        return inp

    def shard_hidden(self, hidden_TD, inp):
        return hidden_TD

    def gather_for_head(self, hidden_TD):
        return hidden_TD

    def pad_vision(self, pixels_TP, grid_thw, merge):
        return pixels_TP, grid_thw

    def shard_vision(self, x_TD):
        return x_TD

    def local_vision_inputs(self, ctx):
        return ctx

    def gather_vision(self, x_TD):
        return x_TD


class _Absent(nn.Module):
    """Placeholder for a layer another stage owns: keeps list indices (and so state-dict names) global."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this layer lives on another pipeline stage")


def keep_only(model: Qwen2_5_VL, specs: list[StageSpec]) -> Qwen2_5_VL:
    """Drop (in place) every layer and boundary unit none of `specs` (this rank's chunks) owns, so a
    rank holds only its stages' parameters. Parameter names stay global (`model.layers.17.…`)."""
    vit_keep = {i for s in specs for i in range(s.vit_start, s.vit_end)}
    llm_keep = {i for s in specs for i in range(s.llm_start, s.llm_end)}
    for i in range(len(model.visual.blocks)):
        if i not in vit_keep:
            model.visual.blocks[i] = _Absent()
    for i in range(len(model.model.layers)):
        if i not in llm_keep:
            model.model.layers[i] = _Absent()
    if not any(s.patch_embed for s in specs):
        model.visual.patch_embed = _Absent()
    if not any(s.merger for s in specs):
        model.visual.merger = _Absent()
    owns_embed, owns_head = any(s.embed for s in specs), any(s.head for s in specs)
    if not owns_head:
        model.model.norm = _Absent()
        if model.lm_head is not None:
            model.lm_head = _Absent()
    # A tied LM head is the embedding matrix: the last stage keeps a copy (gradients summed over the
    # pipeline by the training step, as Megatron's embedding group does).
    if not owns_embed and not (owns_head and model.cfg.text.tie_word_embeddings):
        model.model.embed_tokens = _Absent()
    return model


def vision_stream(batch: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """(pixels, grid_thw, number of image rows) with images and videos as one stream."""
    parts = [(batch.get("pixel_values"), batch.get("image_grid_thw")),
             (batch.get("pixel_values_videos"), batch.get("video_grid_thw"))]
    parts = [(p, torch.as_tensor(g)) for p, g in parts if p is not None and g is not None]
    if not parts:
        return None, None, 0
    n_image = parts[0][0].shape[0] if batch.get("pixel_values") is not None else 0
    return torch.cat([p for p, _ in parts]), torch.cat([g.reshape(-1, 3) for _, g in parts]), n_image


def decoder_inputs(model: Qwen2_5_VL, batch: dict[str, Any]) -> DecoderInputs:
    return model.inputs(batch["input_ids"], batch.get("cu_seqlens"), batch.get("image_grid_thw"),
                        batch.get("video_grid_thw"), batch.get("second_per_grid_ts"), batch.get("labels"),
                        batch.get("position_ids"))


def stage_forward(model: Qwen2_5_VL, spec: StageSpec, batch: dict[str, Any], x_in: torch.Tensor | None,
                  transforms: Transforms | None = None) -> torch.Tensor | CausalLMOutput:
    """This stage's part of one micro-batch: the tensor for the next stage, or (last stage) the
    CausalLMOutput whose loss_sum covers this rank's tokens. `batch` is the micro-batch as the data
    loader gives it (every stage sees the same one); x_in what the previous stage sent (None first)."""
    tf = transforms or NoTransforms()
    batch = tf.pad_batch(batch)
    inp = decoder_inputs(model, batch)
    pixels, grid, n_image_rows = vision_stream(batch)
    x = x_in

    if spec.vit_end > spec.vit_start or spec.patch_embed or spec.merger:
        if pixels is not None:
            merged_rows = pixels.shape[0] // model.cfg.vision.spatial_merge_size ** 2
            pixels, grid = tf.pad_vision(pixels, grid, model.cfg.vision.spatial_merge_size)
            vctx = model.visual.inputs(pixels, grid)
            if spec.patch_embed:
                x = tf.shard_vision(model.visual.embed(pixels, vctx))
            x = model.visual.run_blocks(x, tf.local_vision_inputs(vctx),
                                        model.visual.blocks[spec.vit_start:spec.vit_end])
            if spec.merger:
                x = model.visual.merge(tf.gather_vision(x), vctx)[:merged_rows]   # without the padding image
        elif spec.patch_embed:
            x = None

    if spec.embed:
        image_embeds = video_embeds = None
        if x is not None and pixels is not None:
            unit = model.cfg.vision.spatial_merge_size ** 2
            image_embeds, video_embeds = x[:n_image_rows // unit], x[n_image_rows // unit:]
            image_embeds = image_embeds if batch.get("pixel_values") is not None else None
            video_embeds = video_embeds if batch.get("pixel_values_videos") is not None else None
        hidden = model.embed(inp, image_embeds, video_embeds, has_images=batch.get("image_grid_thw") is not None,
                             has_videos=batch.get("video_grid_thw") is not None)
        x = tf.shard_hidden(hidden, inp)

    if spec.llm_end > spec.llm_start or spec.head:
        local = tf.local_inputs(inp)
        x = model.decode(x, local, model.model.layers[spec.llm_start:spec.llm_end])
        if spec.head:
            return model.head(tf.gather_for_head(x), local)
    if x is None:
        # A vision stage with no pixels in this micro-batch still sends something (an empty tensor).
        x = torch.empty(0, model.cfg.vision.hidden_size, device=batch["input_ids"].device,
                        dtype=next(model.parameters()).dtype)
    return x
