"""Typed configuration of Qwen2.5-VL, read from and written to Hugging Face `config.json` dicts
(both the flat layout of the released checkpoints and the nested `text_config` layout of
transformers >= 5), plus presets for the released shapes and a tiny one for tests and the demo."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class VisionConfig:
    """The vision tower (ViT with 2-D RoPE, window attention and a 2x2 patch merger)."""
    depth: int = 32                          # number of ViT blocks
    hidden_size: int = 1280                  # ViT width
    intermediate_size: int = 3420            # SwiGLU width of each block's MLP
    num_heads: int = 16                      # attention heads (head_dim = hidden_size / num_heads)
    in_channels: int = 3                     # image channels
    patch_size: int = 14                     # spatial patch side in pixels
    temporal_patch_size: int = 2             # frames per patch
    spatial_merge_size: int = 2              # patches merged per side into one LLM token
    window_size: int = 112                   # window side in pixels for window-attention blocks
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])  # blocks with full attention
    out_hidden_size: int = 3584              # merger output width (= text hidden size)
    tokens_per_second: int = 2               # temporal M-RoPE positions per second of video
    rms_norm_eps: float = 1e-6               # RMSNorm epsilon of blocks and merger (fixed in HF)
    rope_theta: float = 10000.0              # 2-D RoPE base

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch row: channels x frames x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size


@dataclass
class TextConfig:
    """The Qwen2 decoder with M-RoPE."""
    vocab_size: int = 152064                 # embedding rows
    hidden_size: int = 3584                  # model width
    intermediate_size: int = 18944           # SwiGLU width
    num_hidden_layers: int = 28              # decoder layers
    num_attention_heads: int = 28            # query heads
    num_key_value_heads: int = 4             # key/value heads (GQA)
    rms_norm_eps: float = 1e-6               # RMSNorm epsilon
    rope_theta: float = 1000000.0            # M-RoPE base
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])  # t/h/w split of head_dim/2
    max_position_embeddings: int = 128000    # kept for the round trip to HF; not a hard limit here
    tie_word_embeddings: bool = False        # LM head shares the embedding matrix

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class Qwen2_5_VLConfig:
    """The whole model: vision tower, text decoder and the special token ids that join them."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = 151655             # <|image_pad|>
    video_token_id: int = 151656             # <|video_pad|>
    vision_start_token_id: int = 151652      # <|vision_start|>
    vision_end_token_id: int = 151653        # <|vision_end|>
    bos_token_id: int | None = 151643        # kept for the round trip to HF
    eos_token_id: int | None = 151645        # kept for the round trip to HF

    def validate(self) -> None:
        """Raise ValueError naming the field when the shapes cannot work together."""
        v, t = self.vision, self.text
        problems = []
        if v.hidden_size % v.num_heads:
            problems.append(f"vision.hidden_size {v.hidden_size} is not divisible by vision.num_heads {v.num_heads}")
        elif v.head_dim % 4:
            problems.append(f"vision head_dim {v.head_dim} must be a multiple of 4 (2-D RoPE halves)")
        if t.hidden_size % t.num_attention_heads:
            problems.append(f"text.hidden_size {t.hidden_size} is not divisible by "
                            f"text.num_attention_heads {t.num_attention_heads}")
        elif sum(t.mrope_section) * 2 != t.head_dim:
            problems.append(f"text.mrope_section {t.mrope_section} must sum to head_dim/2 = {t.head_dim // 2}")
        if t.num_attention_heads % t.num_key_value_heads:
            problems.append(f"text.num_attention_heads {t.num_attention_heads} is not a multiple of "
                            f"text.num_key_value_heads {t.num_key_value_heads}")
        if v.out_hidden_size != t.hidden_size:
            problems.append(f"vision.out_hidden_size {v.out_hidden_size} must equal text.hidden_size {t.hidden_size}")
        if len(t.mrope_section) != 3:
            problems.append(f"text.mrope_section must have 3 entries (t, h, w), got {t.mrope_section}")
        bad_blocks = [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]
        if bad_blocks:
            problems.append(f"vision.fullatt_block_indexes {bad_blocks} are outside 0..{v.depth - 1}")
        merged = v.window_size // v.spatial_merge_size // v.patch_size
        if merged < 1:
            problems.append(f"vision.window_size {v.window_size} is smaller than one merged patch "
                            f"({v.spatial_merge_size * v.patch_size} px)")
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            value = getattr(self, name)
            if not 0 <= value < t.vocab_size:
                problems.append(f"{name} {value} is outside the vocabulary (text.vocab_size {t.vocab_size})")
        if problems:
            raise ValueError("invalid Qwen2.5-VL config:\n  " + "\n  ".join(problems))

    # ---- Hugging Face config.json --------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "Qwen2_5_VLConfig":
        """Read a Hugging Face Qwen2.5-VL `config.json` dict (flat released layout or nested
        `text_config` layout)."""
        if d.get("model_type") not in (None, "qwen2_5_vl"):
            raise ValueError(f"config.json: model_type is {d.get('model_type')!r}, expected 'qwen2_5_vl'")
        text_src = dict(d)
        text_src.update(d.get("text_config") or {})
        rope = text_src.get("rope_parameters") or text_src.get("rope_scaling") or {}
        vision_src = dict(d.get("vision_config") or {})
        if "in_chans" in vision_src and "in_channels" not in vision_src:
            vision_src["in_channels"] = vision_src["in_chans"]
        if "spatial_patch_size" in vision_src and "patch_size" not in vision_src:
            vision_src["patch_size"] = vision_src["spatial_patch_size"]
        vrope = vision_src.get("rope_parameters") or {}
        if "rope_theta" in vrope:
            vision_src["rope_theta"] = vrope["rope_theta"]
        vision = _pick(VisionConfig, vision_src)
        text = _pick(TextConfig, text_src)
        if "rope_theta" in rope:
            text.rope_theta = float(rope["rope_theta"])
        if "mrope_section" in rope:
            text.mrope_section = [int(s) for s in rope["mrope_section"]]
        tie = d.get("tie_word_embeddings", (d.get("text_config") or {}).get("tie_word_embeddings"))
        if tie is not None:
            text.tie_word_embeddings = bool(tie)
        top = _pick(cls, d, skip=("vision", "text"))
        top.vision, top.text = vision, text
        return top

    def to_hf_dict(self) -> dict[str, Any]:
        """A `config.json` dict that transformers (>= 4.49, flat + nested keys) loads as
        Qwen2_5_VLForConditionalGeneration."""
        t, v = self.text, self.vision
        text = {
            "model_type": "qwen2_5_vl_text", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
            "hidden_act": "silu", "rms_norm_eps": t.rms_norm_eps, "max_position_embeddings": t.max_position_embeddings,
            "rope_theta": t.rope_theta, "use_sliding_window": False, "attention_dropout": 0.0,
            "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": list(t.mrope_section)},
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                "mrope_section": list(t.mrope_section)},
            "tie_word_embeddings": t.tie_word_embeddings,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
        }
        vision = {
            "model_type": "qwen2_5_vl_vision", "depth": v.depth, "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size, "num_heads": v.num_heads, "in_channels": v.in_channels,
            "in_chans": v.in_channels, "patch_size": v.patch_size, "spatial_patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.spatial_merge_size,
            "window_size": v.window_size, "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "out_hidden_size": v.out_hidden_size, "tokens_per_second": v.tokens_per_second, "hidden_act": "silu",
        }
        flat = {k: val for k, val in text.items() if k != "model_type"}
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            **flat, "text_config": text, "vision_config": vision,
            "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id, "vision_end_token_id": self.vision_end_token_id,
        }

    # ---- presets -------------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str) -> "Qwen2_5_VLConfig":
        """'tiny' (tests and the CPU demo), '100m' (CPU benchmark), or a released size: '3b', '7b',
        '32b', '72b' (numbers from the released config.json files)."""
        try:
            make = _PRESETS[name.lower()]
        except KeyError:
            raise ValueError(f"unknown Qwen2.5-VL preset {name!r}; choose one of {sorted(_PRESETS)}") from None
        return make()


def _pick(kind, src: dict[str, Any], skip: tuple[str, ...] = ()):
    """An instance of dataclass `kind` from the keys of src it knows (others are ignored)."""
    names = {f.name for f in dataclasses.fields(kind)} - set(skip)
    return kind(**{k: src[k] for k in names if k in src and src[k] is not None})


def _released(text: dict[str, Any], vision: dict[str, Any]) -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(vision=VisionConfig(**vision), text=TextConfig(**text))


# Qwen2's special tokens in their released order (<|endoftext|> = 151643, ...), placed at the end of
# a small vocabulary for the tiny and 100m configs; `mmfuse.data` builds matching tokenizers.
SMALL_VOCAB_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                              "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def _small(text: dict[str, Any], vision: dict[str, Any]) -> Qwen2_5_VLConfig:
    cfg = _released(text, vision)
    ids = {tok: cfg.text.vocab_size - len(SMALL_VOCAB_SPECIAL_TOKENS) + i
           for i, tok in enumerate(SMALL_VOCAB_SPECIAL_TOKENS)}
    cfg.bos_token_id, cfg.eos_token_id = ids["<|endoftext|>"], ids["<|im_end|>"]
    cfg.vision_start_token_id, cfg.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    cfg.image_token_id, cfg.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
    return cfg


_PRESETS = {
    "tiny": lambda: _small(
        dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, mrope_section=[2, 3, 3], tie_word_embeddings=True, max_position_embeddings=4096),
        dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
             fullatt_block_indexes=[1])),
    "100m": lambda: _small(
        dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, mrope_section=[8, 12, 12], tie_word_embeddings=True),
        dict(depth=8, hidden_size=384, intermediate_size=1024, num_heads=6, out_hidden_size=512,
             fullatt_block_indexes=[3, 7])),
    "3b": lambda: _released(
        dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
             num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
        dict(intermediate_size=3420, out_hidden_size=2048)),
    "7b": lambda: _released(
        dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
             num_attention_heads=28, num_key_value_heads=4),
        dict(intermediate_size=3420, out_hidden_size=3584)),
    "32b": lambda: _released(
        dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
             num_attention_heads=40, num_key_value_heads=8),
        dict(intermediate_size=3456, out_hidden_size=5120)),
    "72b": lambda: _released(
        dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
             num_attention_heads=64, num_key_value_heads=8),
        dict(intermediate_size=3456, out_hidden_size=8192)),
}
