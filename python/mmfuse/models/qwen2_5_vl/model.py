"""Qwen2.5-VL for training on packed token streams: vision tower → image/video embeddings placed
at their pad tokens → M-RoPE decoder → loss through fused linear cross-entropy (full logits are
never built in training).

Module names equal the released checkpoints' state-dict names (`visual.*`, `model.*`,
`lm_head.*`), so the Hugging Face adapter is a near-identity rename.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmfuse.models.common.kv_cache import KVCache
from mmfuse.models.common.layers import LinearCrossEntropyLoss
from mmfuse.models.common.recompute import RecomputeConfig, run_layers, set_selective
from mmfuse.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from mmfuse.models.qwen2_5_vl.rope_index import rope_position_ids
from mmfuse.models.qwen2_5_vl.text import TextModel
from mmfuse.models.qwen2_5_vl.vision import VisionTransformer


@dataclass
class CausalLMOutput:
    """What a forward returns. loss = loss_sum / max(num_label_tokens, 1)."""
    loss: torch.Tensor | None = None              # mean next-token loss over label tokens
    loss_sum: torch.Tensor | None = None          # summed loss (for exact means across micro-batches)
    num_label_tokens: int = 0                     # tokens whose label is not ignore_index
    logits: torch.Tensor | None = None            # [T, V] (or [B, S, V] for batched input), when asked for


def shift_labels(labels: torch.Tensor, cu_seqlens: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token targets within each packed sample: target[t] = labels[t + 1], and ignore_index at
    each sample's last token (it must not predict the next sample's first token)."""
    shifted = torch.roll(labels, -1)
    shifted[cu_seqlens[1:].long() - 1] = ignore_index
    return shifted


class Qwen2_5_VL(nn.Module):
    """The whole model. forward() takes one packed stream (or an unpadded [B, S] batch)."""

    def __init__(self, cfg: Qwen2_5_VLConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vision)
        self.model = TextModel(cfg.text)
        self.lm_head = None if cfg.text.tie_word_embeddings else \
            nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self.lm_loss = LinearCrossEntropyLoss()
        self.vision_recompute: RecomputeConfig | None = None
        self.text_recompute: RecomputeConfig | None = None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """HF's initialisation (initializer_range 0.02): linear and embedding weights N(0, std),
        biases 0, norm weights 1. A no-op on the meta device (from_pretrained fills the weights)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if module.weight.is_meta:
                    continue
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif hasattr(module, "eps") and isinstance(getattr(module, "weight", None), nn.Parameter):
                if not module.weight.is_meta:
                    module.weight.fill_(1.0)

    # ---- Hugging Face directories --------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, hf_dir, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> "Qwen2_5_VL":
        """Load a Hugging Face Qwen2.5-VL directory (config.json + safetensors) without
        transformers. Parameters are created directly from the file (no random init pass)."""
        from mmfuse.models.qwen2_5_vl import hf_adapter

        cfg = hf_adapter.read_config(hf_dir)
        with torch.device("meta"):
            model = cls(cfg)
        hf_adapter.load_state_dict(model, hf_dir, dtype=dtype, device=device)
        return model

    def save_pretrained(self, out_dir) -> None:
        """Write a directory transformers loads as Qwen2_5_VLForConditionalGeneration."""
        from mmfuse.models.qwen2_5_vl import hf_adapter

        hf_adapter.save_pretrained(self, out_dir)

    # ---- configuration -------------------------------------------------------------------------

    def set_recompute(self, vision: RecomputeConfig | None = None, text: RecomputeConfig | None = None) -> None:
        """Recompute policy per module (MindSpeed-MM semantics; see RecomputeConfig)."""
        for name, policy in (("vision", vision), ("text", text)):
            if policy is not None:
                policy.validate(f"{name}_recompute")
        self.vision_recompute, self.text_recompute = vision, text
        set_selective(self.visual.blocks, vision or RecomputeConfig())
        set_selective(self.model.layers, text or RecomputeConfig())
        self.visual.recompute = vision

    @property
    def output_weight(self) -> torch.Tensor:
        """The LM head matrix [V, D] (the embedding matrix when tied)."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    # ---- forward ----------------------------------------------------------------------------------
    # forward = inputs → vision_embeds → embed → decode → head. The parts are public so parallel plans
    # (pipeline stages, context and sequence parallel runners) can put their own steps between them.

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                video_grid_thw: torch.Tensor | None = None, second_per_grid_ts: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, return_logits: bool | None = None,
                ignore_index: int = -100) -> CausalLMOutput:
        """input_ids [T] with cu_seqlens int32 [B + 1] (packed samples; None = one sample), or an
        unpadded batch [B, S]. labels like input_ids, not shifted (the model shifts within each
        sample). position_ids [3, T] are derived from the grids when not given. Logits are returned
        when return_logits is True, or when it is None and there are no labels."""
        inp = self.inputs(input_ids, cu_seqlens, image_grid_thw, video_grid_thw, second_per_grid_ts, labels,
                          position_ids, ignore_index)
        image_embeds = self.visual(pixel_values, image_grid_thw) if pixel_values is not None else None
        video_embeds = self.visual(pixel_values_videos, video_grid_thw) if pixel_values_videos is not None else None
        hidden_TD = self.embed(inp, image_embeds, video_embeds,
                               has_images=image_grid_thw is not None, has_videos=video_grid_thw is not None)
        hidden_TD = self.decode(hidden_TD, inp, self.model.layers)
        return self.head(hidden_TD, inp, return_logits)

    def inputs(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
               image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
               second_per_grid_ts: torch.Tensor | None = None, labels: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, ignore_index: int = -100) -> "DecoderInputs":
        """Everything of a micro-batch the decoder needs besides hidden states (no parameters used)."""
        batch_shape = tuple(input_ids.shape)
        ids_T, cu_seqlens = _packed(input_ids, cu_seqlens)
        if position_ids is None:
            position_ids = rope_position_ids(
                ids_T, cu_seqlens, image_grid_thw, video_grid_thw, second_per_grid_ts,
                image_token_id=self.cfg.image_token_id, video_token_id=self.cfg.video_token_id,
                spatial_merge_size=self.cfg.vision.spatial_merge_size, tokens_per_second=self.cfg.vision.tokens_per_second)
        target_T = None
        if labels is not None:
            labels_T = labels.reshape(-1)
            if labels_T.shape != ids_T.shape:
                raise ValueError(f"labels has {labels_T.numel()} tokens, input_ids {ids_T.numel()}")
            target_T = shift_labels(labels_T, cu_seqlens, ignore_index)
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
        return DecoderInputs(ids_T, position_ids.reshape(3, -1), self.model.inv_freq(ids_T.device), cu_seqlens,
                             max_seqlen, target_T, ignore_index, batch_shape)

    def embed(self, inp: "DecoderInputs", image_embeds: torch.Tensor | None = None,
              video_embeds: torch.Tensor | None = None, has_images: bool = False,
              has_videos: bool = False) -> torch.Tensor:
        """Token embeddings [T, D] with the vision tower's outputs written at the pad tokens."""
        hidden_TD = self.model.embed_tokens(inp.ids)
        hidden_TD = self._place_vision(hidden_TD, inp.ids, image_embeds, has_images, self.cfg.image_token_id, "image")
        return self._place_vision(hidden_TD, inp.ids, video_embeds, has_videos, self.cfg.video_token_id, "video")

    def decode(self, hidden_TD: torch.Tensor, inp: "DecoderInputs", layers, kv_cache: KVCache | None = None
               ) -> torch.Tensor:
        """hidden through `layers` (all of self.model.layers, or a pipeline stage's share). With a
        kv_cache (generation; one LayerKVCache per layer), the tokens attend to their sequences'
        cached tokens as well and add their own keys and values to the cache."""
        if kv_cache is not None:
            if len(kv_cache.layers) != len(layers):
                raise ValueError(f"kv_cache has {len(kv_cache.layers)} layers, the decoder {len(layers)}")
            for layer, cache in zip(layers, kv_cache.layers):
                hidden_TD = layer(hidden_TD, inp.position_ids, inp.inv_freq, inp.cu_seqlens, inp.max_seqlen, cache)
            return hidden_TD

        def layer_call(layer, h):
            return layer(h, inp.position_ids, inp.inv_freq, inp.cu_seqlens, inp.max_seqlen)

        return run_layers(layers, hidden_TD, self.text_recompute, layer_call)

    def head(self, hidden_TD: torch.Tensor, inp: "DecoderInputs", return_logits: bool | None = None) -> CausalLMOutput:
        """Final norm, then the summed next-token loss (fused linear cross-entropy) and/or logits."""
        hidden_TD = self.model.norm(hidden_TD)
        out = CausalLMOutput()
        if inp.target is not None:
            out.loss_sum = self.lm_loss(hidden_TD, self.output_weight, inp.target, inp.ignore_index)
            out.num_label_tokens = int((inp.target != inp.ignore_index).sum())
            out.loss = out.loss_sum / max(out.num_label_tokens, 1)
        if return_logits or (return_logits is None and inp.target is None):
            logits = self.logits(hidden_TD, normed=True)
            out.logits = logits.view(*inp.batch_shape, -1) if len(inp.batch_shape) == 2 else logits
        return out

    def logits(self, hidden_TD: torch.Tensor, normed: bool = False) -> torch.Tensor:
        """[T, V] logits of decoder outputs (the final norm first unless `normed`)."""
        if not normed:
            hidden_TD = self.model.norm(hidden_TD)
        return hidden_TD @ self.output_weight.t()

    def _place_vision(self, hidden_TD, ids_T, feats, has_grid: bool, token_id: int, kind: str):
        """Embeddings with the vision tower's output written at the pad tokens of `kind`."""
        if feats is None:
            if has_grid:
                raise ValueError(f"{kind}_grid_thw given without pixel values")
            return hidden_TD
        if not has_grid:
            raise ValueError(f"pixel values for {kind}s given without {kind}_grid_thw")
        is_pad = ids_T == token_id
        feats = feats.to(hidden_TD.dtype)
        n_pad = int(is_pad.sum())
        if n_pad != feats.shape[0]:
            raise ValueError(f"{kind}s give {feats.shape[0]} embeddings but input_ids hold {n_pad} {kind} pad tokens")
        return hidden_TD.masked_scatter(is_pad.unsqueeze(-1), feats)


@dataclass
class DecoderInputs:
    """A packed micro-batch as the decoder sees it, besides the hidden states."""
    ids: torch.Tensor                   # [T] token ids
    position_ids: torch.Tensor          # [3, T] M-RoPE positions (t, h, w streams)
    inv_freq: torch.Tensor              # [d/2] fp32 rotary frequencies
    cu_seqlens: torch.Tensor            # int32 [B + 1] sample boundaries
    max_seqlen: int                     # longest sample
    target: torch.Tensor | None         # [T] next-token targets (ignore_index where none), None without labels
    ignore_index: int = -100
    batch_shape: tuple[int, ...] = ()   # input_ids' shape ([T] or [B, S]) for shaping logits


def _packed(input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None):
    """(ids [T], cu_seqlens int32 [B + 1]) from [T] + cu_seqlens or an unpadded [B, S] batch."""
    if input_ids.dim() == 2:
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens describes a packed [T] stream; pass input_ids as [T], not "
                             f"{tuple(input_ids.shape)}")
        b, s = input_ids.shape
        return input_ids.reshape(-1), torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=input_ids.device)
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be [T] (packed) or [B, S], got {tuple(input_ids.shape)}")
    t = input_ids.shape[0]
    if cu_seqlens is None:
        return input_ids, torch.tensor([0, t], dtype=torch.int32, device=input_ids.device)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != t:
        raise ValueError(f"cu_seqlens must be [B + 1] from 0 to T = {t}, got {cu_seqlens.tolist()}")
    return input_ids, cu_seqlens.to(torch.int32)
