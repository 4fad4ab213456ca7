"""A MindSpeed-MM Qwen2.5-VL `model.json`, read for what it means to an mmfuse run: its shapes are
checked against the checkpoint's config.json (MindSpeed-MM trusts model.json and fails later, or
trains a different model), its `freeze` flags become freeze groups, its per-block
`recompute_*` keys become recompute policies and its `pipeline_num_layers` the pipeline split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmfuse.models.common.recompute import RecomputeConfig
from mmfuse.models.qwen2_5_vl.config import Qwen2_5_VLConfig

# model_id values of MindSpeed-MM's Qwen2.5-VL examples (72B's ViT is qwen2_5_vit).
MODEL_IDS = {"": ("qwen2_5vl",), "image_encoder.vision_encoder": ("qwen2vit", "qwen2_5_vit"),
             "image_encoder.vision_projector": ("lnmlp",), "text_decoder": ("qwen2_5_lm",)}


@dataclass
class ModelJson:
    """What an mmfuse run takes from model.json."""
    freeze: list[str] = field(default_factory=list)       # freeze groups (vision_encoder, projector)
    recompute_vision: RecomputeConfig | None = None
    recompute_text: RecomputeConfig | None = None
    bf16_blocks: list[str] = field(default_factory=list)  # blocks whose bf16/params_dtype ask for bf16
    vit_pp_layers: list | None = None  # vision_encoder.pipeline_num_layers: per stage, or nested [chunk][stage]
    llm_pp_layers: list | None = None  # text_decoder.pipeline_num_layers, same form
    ignored: list[str] = field(default_factory=list)      # keys read by MindSpeed-MM with no effect here


def _expected(cfg: Qwen2_5_VLConfig) -> dict[str, Any]:
    """model.json key path -> the value the checkpoint implies."""
    v, t = cfg.vision, cfg.text
    ve, vp, td = "image_encoder.vision_encoder", "image_encoder.vision_projector", "text_decoder"
    return {
        "vision_start_token_id": cfg.vision_start_token_id,
        f"{ve}.num_layers": v.depth, f"{ve}.hidden_size": v.hidden_size,
        f"{ve}.num_attention_heads": v.num_heads, f"{ve}.ffn_hidden_size": v.intermediate_size,
        f"{ve}.intermediate_size": v.intermediate_size, f"{ve}.fullatt_block_indexes": list(v.fullatt_block_indexes),
        f"{ve}.window_attn_size": v.window_size, f"{ve}.patch_size": v.patch_size,
        f"{ve}.spatial_merge_size": v.spatial_merge_size, f"{ve}.temporal_patch_size": v.temporal_patch_size,
        f"{ve}.in_channels": v.in_channels, f"{ve}.tokens_per_second": v.tokens_per_second,
        # the merger: LayerNorm, Linear(4*vit, 4*vit), GELU, Linear(4*vit, llm hidden) for a 2x2 merge
        f"{vp}.input_size": v.hidden_size, f"{vp}.hidden_size": v.out_hidden_size,
        f"{vp}.ffn_hidden_size": v.hidden_size * v.spatial_merge_size ** 2,
        f"{td}.num_layers": t.num_hidden_layers, f"{td}.hidden_size": t.hidden_size,
        f"{td}.ffn_hidden_size": t.intermediate_size, f"{td}.num_attention_heads": t.num_attention_heads,
        f"{td}.num_query_groups": t.num_key_value_heads, f"{td}.vocab_size": t.vocab_size,
        f"{td}.mrope_section": list(t.mrope_section), f"{td}.rope_theta": t.rope_theta,
        f"{td}.untie_embeddings_and_output_weights": not t.tie_word_embeddings,
    }


def _get(d: dict[str, Any], path: str) -> Any:
    node: Any = d
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def check_against_checkpoint(model_json: dict[str, Any], cfg: Qwen2_5_VLConfig, where: str = "model.json") -> None:
    """Raise ValueError listing every model.json field that disagrees with the checkpoint."""
    problems = []
    for path, want in _expected(cfg).items():
        have = _get(model_json, path)
        if have is not None and have != want:
            problems.append(f"{path}: model.json {have!r}, checkpoint {want!r}")
    # img_context_token_id is the image pad for image data and the video pad for video data
    token = model_json.get("img_context_token_id")
    if token is not None and token not in (cfg.image_token_id, cfg.video_token_id):
        problems.append(f"img_context_token_id: model.json {token!r}, checkpoint {cfg.image_token_id!r} "
                        f"(image_token_id) or {cfg.video_token_id!r} (video_token_id)")
    for path, ids in MODEL_IDS.items():
        have = model_json.get("model_id") if not path else _get(model_json, f"{path}.model_id")
        if have is not None and have not in ids:
            problems.append(f"{path + '.' if path else ''}model_id: {have!r}, mmfuse trains Qwen2.5-VL ({ids})")
    if problems:
        raise ValueError(f"{where} does not describe the checkpoint (fix model.json or point --load / "
                         f"model_name_or_path at the matching checkpoint):\n  " + "\n  ".join(problems))


def _recompute(block: dict[str, Any], where: str) -> RecomputeConfig | None:
    granularity = block.get("recompute_granularity")
    if granularity is None:
        return None
    method, num_layers = block.get("recompute_method"), block.get("recompute_num_layers")
    if granularity == "full" and (method is None or num_layers is None):
        # Megatron refuses 'full' without both, rather than guessing a policy
        raise ValueError(f"{where}.recompute_granularity 'full' needs recompute_method (uniform | block) and "
                         f"recompute_num_layers in the same block")
    policy = RecomputeConfig(granularity=granularity, method=method or "uniform",
                             num_layers=1 if num_layers is None else num_layers)
    policy.validate(where + ".recompute")
    return policy


def _flag(block: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = block.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{where}.{key}: expected true or false, got {value!r}")
    return value


def read_model_json(model_json: dict[str, Any], where: str = "model.json") -> ModelJson:
    """Freeze groups, recompute policies and precision requests of a MindSpeed-MM model.json."""
    if not isinstance(model_json.get("image_encoder"), dict) or not isinstance(model_json.get("text_decoder"), dict):
        raise ValueError(f"{where}: needs 'image_encoder' (vision_encoder, vision_projector) and 'text_decoder' "
                         f"blocks, as in MindSpeed-MM's examples/qwen2.5vl/model_*.json")
    for key in ("text_encoder", "video_encoder", "audio_encoder"):
        if model_json.get(key) is not None:
            raise ValueError(f"{where}.{key}: must be null for Qwen2.5-VL, got a block")
    ve = model_json["image_encoder"].get("vision_encoder") or {}
    vp = model_json["image_encoder"].get("vision_projector") or {}
    td = model_json["text_decoder"]
    out = ModelJson()
    # MindSpeed-MM's defaults: the ViT frozen, the projector trained (pretrain_vlm.py _apply_freezing)
    if _flag(ve, "freeze", True, f"{where}.image_encoder.vision_encoder"):
        out.freeze.append("vision_encoder")
    if _flag(vp, "freeze", False, f"{where}.image_encoder.vision_projector"):
        out.freeze.append("projector")
    if td.get("freeze"):
        out.ignored.append("text_decoder.freeze (MindSpeed-MM never freezes the decoder from model.json; "
                           "use --set model.freeze=[...])")
    out.recompute_vision = _recompute(ve, f"{where}.image_encoder.vision_encoder")
    out.recompute_text = _recompute(td, f"{where}.text_decoder")
    blocks = {"image_encoder.vision_encoder": ve, "image_encoder.vision_projector": vp, "text_decoder": td}
    for name, block in blocks.items():
        if block.get("fp16"):
            raise ValueError(f"{where}.{name}.fp16: fp16 is not supported (no loss scaling); use bf16")
        if block.get("bf16") or str(block.get("params_dtype", "")).lower() in ("bf16", "bfloat16"):
            out.bf16_blocks.append(name)
    out.vit_pp_layers = _pp_layers(ve, f"{where}.image_encoder.vision_encoder")
    out.llm_pp_layers = _pp_layers(td, f"{where}.text_decoder")
    if model_json.get("patch") and any((model_json["patch"] or {}).values()):
        out.ignored.append("patch (MindSpeed-MM function replacements)")
    return out


def _pp_layers(block: dict[str, Any], where: str) -> list | None:
    """pipeline_num_layers as written: a list of layer counts per stage, or MindSpeed-MM's VPP form,
    one equally long list per model chunk. Sums and lengths are checked against the model and the
    layout later (ParallelLayout.stage_layers)."""
    value = block.get("pipeline_num_layers")
    if value is None:
        return None
    form = (f"{where}.pipeline_num_layers: expected layer counts per stage ([12, 16]) or one list per "
            f"virtual-pipeline chunk ([[6, 8], [6, 8]]), got {value!r}")
    if not isinstance(value, list) or not value:
        raise ValueError(form)
    if all(isinstance(x, list) for x in value):
        if len({len(x) for x in value}) != 1:
            raise ValueError(f"{form}; every chunk needs one entry per pipeline stage")
        counts = [n for x in value for n in x]
    else:
        counts = value
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
        raise ValueError(form)
    return value
