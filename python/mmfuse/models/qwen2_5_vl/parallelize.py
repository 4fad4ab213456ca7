"""The tensor-parallel plan of Qwen2.5-VL: which module is split how (MindSpeed-MM's TP split
patterns, mindspeed-mm.md §5: row-split qkv/fc1/embeddings/output layer, column-split proj/fc2;
here as Megatron's column / row / vocab layers over the unfused HF modules).

Sequence parallelism shards tokens between the TP regions of the decoder and of the vision blocks
(whose stream is in window order; attention runs inside the TP region on every patch, so the split
needs no care for windows). The merger runs whole on every rank after an all-gather: every rank needs
all merged tokens for the placement at the image pads.

Training computes the loss without logits (vocab-parallel linear cross-entropy). `model.head(...,
return_logits=True)` on a TP model returns this rank's vocabulary columns only ([T, V/tp]).
"""

from __future__ import annotations

import re

from torch import nn

from mmfuse.models.qwen2_5_vl.model import Qwen2_5_VL
from mmfuse.parallel.collectives import group_size
from mmfuse.parallel.lora_parallel import with_lora
from mmfuse.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from mmfuse.parallel.vocab_parallel_loss import VocabParallelLinearCrossEntropy

# (module name pattern, style, blocks split separately, sequence parallel where the run uses it)
TP_PLAN: list[tuple[str, str, int, bool]] = [
    (r"visual\.blocks\.\d+\.attn\.qkv",              "column", 3, True),   # fused [q; k; v]: rank r gets [q_r; k_r; v_r]
    (r"visual\.blocks\.\d+\.attn\.proj",             "row",    1, True),
    (r"visual\.blocks\.\d+\.mlp\.(gate|up)_proj",    "column", 1, True),
    (r"visual\.blocks\.\d+\.mlp\.down_proj",         "row",    1, True),
    (r"visual\.merger\.mlp\.0",                      "column", 1, False),
    (r"visual\.merger\.mlp\.2",                      "row",    1, False),
    (r"model\.embed_tokens",                         "vocab",  1, False),  # output all-reduced: every token
    (r"model\.layers\.\d+\.self_attn\.[qkv]_proj",   "column", 1, True),   # whole heads (and whole KV heads)
    (r"model\.layers\.\d+\.self_attn\.o_proj",       "row",    1, True),
    (r"model\.layers\.\d+\.mlp\.(gate|up)_proj",     "column", 1, True),
    (r"model\.layers\.\d+\.mlp\.down_proj",          "row",    1, True),
    (r"lm_head",                                     "column", 1, False),  # vocab rows; only the loss reads it
]

# Replicated parameters whose gradient is partial per rank under sequence parallelism: the decoder's
# and the vision blocks' norms see T/tp tokens; the final norm's output gradient is this rank's
# vocabulary share. (Row-parallel biases mark themselves: tensor_parallel.RowParallelLinear.)
SEQUENCE_PARALLEL_PARAMS = (r"model\.(layers\.\d+\.(input_layernorm|post_attention_layernorm)|norm)\.weight"
                            r"|visual\.blocks\.\d+\.norm[12]\.weight")

_BUILD = {
    # a LoRALinear (models/common/lora.py) becomes the same layer with its adapters split to match
    "column": lambda m, g, sp, blocks, ov: with_lora(ColumnParallelLinear.from_linear(m, g, sp, blocks, ov), m, blocks),
    "row": lambda m, g, sp, blocks, ov: with_lora(RowParallelLinear.from_linear(m, g, sp, blocks, ov), m, blocks),
    "vocab": lambda m, g, sp, blocks, ov: VocabParallelEmbedding.from_embedding(m, g),
}


def check_divisible(model: Qwen2_5_VL, tp: int) -> None:
    """ValueError naming the first model width tp does not divide."""
    text, vision = model.cfg.text, model.cfg.vision
    for value, what in [(text.num_attention_heads, "text num_attention_heads"),
                        (text.num_key_value_heads, "text num_key_value_heads"),
                        (text.intermediate_size, "text intermediate_size"),
                        (text.vocab_size, "vocab_size"),
                        (vision.num_heads, "vision num_heads"),
                        (vision.intermediate_size, "vision intermediate_size"),
                        (vision.hidden_size * vision.spatial_merge_size ** 2, "merger width")]:
        if value % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide the model's {what} ({value})")


def apply_tensor_parallel(model: Qwen2_5_VL, tp_group, sequence_parallel: bool,
                          overlap_chunks: int = 0) -> Qwen2_5_VL:
    """Replace (in place) the modules of TP_PLAN with their tensor-parallel versions, taking this rank's
    slices of the current weights, and the loss with the vocab-parallel one. Works on a model cut by
    pipeline.keep_only (absent layers are skipped). overlap_chunks > 1 (with sequence_parallel) overlaps
    the decoder's all-gathers and reduce-scatters with the GEMMs in that many token chunks."""
    tp = group_size(tp_group)
    check_divisible(model, tp)
    plan = [(re.compile(p), style, blocks, sp) for p, style, blocks, sp in TP_PLAN]
    targets = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        for pattern, style, blocks, sp in plan:
            if pattern.fullmatch(name):
                targets.append((name, style, blocks, sp))
                break
    for name, style, blocks, sp in targets:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        sp = sp and sequence_parallel
        setattr(owner, attr, _BUILD[style](getattr(owner, attr), tp_group, sp, blocks, overlap_chunks if sp else 0))
    for p in model.parameters():
        if not hasattr(p, "tp_shard"):
            p.tp_shard = None     # replicated: checkpoints take it from any rank
    if sequence_parallel:
        marked = re.compile(SEQUENCE_PARALLEL_PARAMS)
        for name, p in model.named_parameters():
            if marked.fullmatch(name):
                p.sequence_parallel = True
    model.lm_loss = VocabParallelLinearCrossEntropy(tp_group, sequence_parallel)
    return model
