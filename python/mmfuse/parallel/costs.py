"""Per-unit arithmetic of Qwen2.5-VL training under a parallel layout: parameters of each unit and
how TP splits them, activation bytes kept for backward, FLOPs, and the bytes each collective sends.
Pure arithmetic on the model config; `planner.py` assembles it into per-stage memory and a step time.

- Precision: bf16 weights, fp32 gradient buffer, fp32 master weights and Adam moments: 2 + 4 + 4 + 8 =
  18 bytes per trainable parameter; ZeRO-1 shards the 12 master/Adam bytes over the dp·cp ranks that
  reduce gradients together: 6 + 12/(dp·cp) (Megatron's distributed optimizer). Frozen: 2 bytes.
- TP (Megatron): column-parallel q/k/v, gate/up, ViT qkv, merger fc1 (weights and biases split);
  row-parallel o_proj, down_proj, ViT proj, merger fc2 (weights split, biases replicated);
  vocab-parallel embedding and LM head; norms and the patch embedding replicated.
- PP: the stage rules of `ParallelLayout.stage_layers`; patch embedding with the first ViT block, merger
  with the last, token embedding with the first decoder layer, norm + LM head on the last stage (a tied
  LM head is copied there), as models/qwen2_5_vl/pipeline.py places them.
- Activations (bytes kept for backward, per micro-batch, from what each op of this model saves, in
  the manner of Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models"; the fused attention stores no T² term, so their 5as/h term is absent; checked against the
  tensors autograd actually keeps in tests/parallel/test_planner.py):
    decoder layer  2·T·(4H/s + (2H + 2K + 3I)/t) + 4·T·heads/t     s = t with SP, else 1
                   (norm inputs and outputs; q, k, v, attention output; gate, up, SwiGLU output;
                   the softmax statistics in fp32). K = key/value width (heads_kv · head_dim).
    ViT block      2·P·(4D/s + (6D + 3I)/t) + 4·P·heads/t
                   (v is a view of the fused qkv output, so all 3D of it stays alive next to the
                   rotated q and k), plus the fp32 rotary tables 4·P·head_dim once per micro-batch.
    loss head      final norm input and output, the input gradient (T·H) and LM-head gradient (V/t·H)
                   that the fused loss computes in forward; while it runs, an fp32 [V/t, H]
                   accumulator and a logits chunk.
    selective      drops the softmax statistics only (the fused kernel already keeps no T² tensor)
    full           2·T·H/s per layer (its input) + one layer's activations while it is recomputed
  With SP, column-parallel linears keep their input sharded and all-gather it again in backward.
  T = seq_length / cp tokens per rank. The ViT blocks run on P/cp patches per CP rank (in the
  formula above P stands for P/cp; the patch embedding and the merger run whole, on P); with SP
  they hold P/(cp·t) patches between their TP regions and send that many to the next stage.
- Communication counts bytes one rank sends (ring algorithms: all-gather/reduce-scatter (n−1)/n of the
  full tensor, all-reduce 2(n−1)/n).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmfuse.parallel.layout import ParallelLayout

PARTS = ("vit", "merger", "embed", "decoder", "head")   # patch embed + ViT blocks, merger, tokens, layers, norm + head
RECOMPUTE = ("none", "selective", "full")
GROUPS = ("vision_encoder", "projector", "text_decoder")  # freezing groups (mmfuse.models.qwen2_5_vl.freeze)
FRAME_PATCHES_MAX = 16384   # full-attention blocks: a micro-batch's patches are assumed to be one image up to this


@dataclass
class Hardware:
    """What the estimate assumes about the machines (memory is `plan`'s device_gib)."""
    devices_per_node: int = 8           # ranks per node: groups within a node use intra_node_gbs
    peak_tflops: float = 989.0          # dense bf16 peak of one device (H100/H200 SXM)
    compute_efficiency: float = 0.5     # fraction of peak the kernels reach when nothing waits
    intra_node_gbs: float = 300.0       # GB/s one rank sends inside a node (achieved NVLink, not nominal)
    inter_node_gbs: float = 40.0        # GB/s one rank sends across nodes (a 400 Gb/s NIC per device)
    reserve_gib: float = 4.0            # CUDA context, communicator buffers, allocator fragmentation


# ---- parameters ----------------------------------------------------------------------------------

def unit_params(cfg: Any, tp: int = 1) -> dict[str, tuple[int, int]]:
    """(held by one TP rank, of which replicated on every TP rank) for each repeated or boundary unit:
    vit_block, patch_embed, merger, embed, decoder_layer, final_norm, lm_head."""
    v, t = cfg.vision, cfg.text
    D, Iv = v.hidden_size, v.intermediate_size
    vit_rep = 4 * D                                           # 2 norms, proj and down_proj biases
    vit_split = (3 * D * D + 3 * D) + D * D + 2 * (D * Iv + Iv) + Iv * D
    M = D * v.spatial_merge_size ** 2
    merger_rep = D + v.out_hidden_size                        # ln_q, fc2 bias
    merger_split = M * M + M + M * v.out_hidden_size
    H, kv = t.hidden_size, t.num_key_value_heads * t.head_dim
    layer_rep = 2 * H
    layer_split = (H * H + H) + 2 * (H * kv + kv) + H * H + 3 * H * t.intermediate_size
    vh = t.vocab_size * H
    return {
        "vit_block": (vit_split // tp + vit_rep, vit_rep),
        "patch_embed": (v.patch_dim * D, v.patch_dim * D),
        "merger": (merger_split // tp + merger_rep, merger_rep),
        "embed": (vh // tp, 0),
        "decoder_layer": (layer_split // tp + layer_rep, layer_rep),
        "final_norm": (H, H),
        "lm_head": (vh // tp, 0),
    }


def model_params(cfg: Any) -> dict[str, int]:
    """Parameters of the whole model by part (PARTS); a tied LM head counts once (in embed)."""
    u = {k: n for k, (n, _) in unit_params(cfg).items()}
    return {
        "vit": u["patch_embed"] + cfg.vision.depth * u["vit_block"],
        "merger": u["merger"],
        "embed": u["embed"],
        "decoder": cfg.text.num_hidden_layers * u["decoder_layer"],
        "head": u["final_norm"] + (0 if cfg.text.tie_word_embeddings else u["lm_head"]),
    }


@dataclass
class VirtualStage:
    """Which units one virtual stage holds (the boundaries as in models/qwen2_5_vl/pipeline.py)."""
    vit: int
    llm: int
    patch_embed: bool
    merger: bool
    embed: bool
    head: bool
    out: str            # what it sends on: "vit" (patch hidden), "merged" (vision features), "hidden", "" (last)


def virtual_stages(vit: list[int], llm: list[int]) -> list[VirtualStage]:
    """The units of every virtual stage from per-stage ViT/decoder layer counts (validated)."""
    n = len(vit)
    first_vit = next((i for i, c in enumerate(vit) if c), -1)
    last_vit = max((i for i, c in enumerate(vit) if c), default=-1)
    first_llm = next((i for i, c in enumerate(llm) if c), n - 1)
    out = []
    for i in range(n):
        sends = ("" if i == n - 1 else "hidden" if i >= first_llm else "merged" if i >= last_vit
                 else "vit" if i >= first_vit else "none")
        out.append(VirtualStage(vit[i], llm[i], i == first_vit, i == last_vit, i == first_llm, i == n - 1, sends))
    return out


class Costs:
    """Bytes, FLOPs and communication of each unit for one layout and workload."""

    def __init__(self, cfg, layout: ParallelLayout, world, seq_length, image_tokens, rc_text, rc_vision, frozen, hw):
        self.cfg, self.layout, self.world, self.hw = cfg, layout, world, hw
        t, v = cfg.text, cfg.vision
        self.tp, self.cp = layout.tp, layout.cp
        self.sp = layout.sequence_parallel and layout.tp > 1
        self.S = seq_length
        self.T = -(-seq_length // layout.cp)               # decoder tokens on one rank
        self.G = image_tokens                              # merged vision tokens (LLM image tokens)
        self.P = image_tokens * v.spatial_merge_size ** 2  # ViT patches
        self.Pb = -(-self.P // layout.cp)                  # patches in the ViT blocks of one rank (CP splits rows)
        self.rc_text, self.rc_vision = rc_text, rc_vision
        self.trainable = {g: g not in frozen for g in GROUPS}
        # Backward runs through a module if it or anything before it trains (vision → projector → decoder).
        self.bwd_vit = self.trainable["vision_encoder"]
        self.bwd_merger = self.bwd_vit or self.trainable["projector"]
        self.bwd_text = self.bwd_merger or self.trainable["text_decoder"]
        self.units = unit_params(cfg, layout.tp)
        self.kv = t.num_key_value_heads * t.head_dim
        self.flops_per_s = hw.peak_tflops * 1e12 * hw.compute_efficiency
        self.spans = spans_nodes(layout, world, hw.devices_per_node)
        self.dp_cp = layout.dp(world) * layout.cp

    # -- activations (bytes, one micro-batch) --

    def text_layer_bytes(self) -> tuple[int, int]:
        """(kept per layer, transient of one layer under full recompute)."""
        if not self.bwd_text:
            return 0, 0
        t, T, tp = self.cfg.text, self.T, self.tp
        s = tp if self.sp else 1
        H, I = t.hidden_size, t.intermediate_size
        lse = 4 * T * t.num_attention_heads // tp
        full = 2 * T * (4 * H // s + (2 * H + 2 * self.kv + 3 * I) // tp) + lse
        if self.cp > 1 and self.layout.cp_kind == "ulysses":
            full += 2 * T * H // tp                       # attention output kept in both head and token layout
        if self.rc_text == "selective":
            return full - lse, 0
        if self.rc_text == "full":
            return 2 * T * H // s, full
        return full, 0

    def vit_block_bytes(self) -> tuple[int, int]:
        if not self.bwd_vit:
            return 0, 0
        v, P, tp = self.cfg.vision, self.Pb, self.tp
        s = tp if self.sp else 1
        D, I = v.hidden_size, v.intermediate_size
        lse = 4 * P * v.num_heads // tp
        full = 2 * P * (4 * D // s + (6 * D + 3 * I) // tp) + lse
        if self.rc_vision == "selective":
            return full - lse, 0
        if self.rc_vision == "full":
            return 2 * P * D // s, full
        return full, 0

    def stage_activation_bytes(self, st: VirtualStage) -> tuple[int, int]:
        """(kept for one micro-batch, transient of a recomputed layer) of one virtual stage."""
        v = self.cfg.vision
        keep = transient = 0
        if st.vit:
            per, tr = self.vit_block_bytes()
            keep += st.vit * per
            transient = max(transient, tr)
        if st.patch_embed and self.bwd_vit:
            keep += 2 * self.P * v.patch_dim
        if st.vit and self.bwd_vit:
            keep += 4 * self.Pb * v.head_dim                       # rotary cos/sin tables (fp32), this rank's rows
        if st.merger and self.bwd_merger:
            keep += 2 * self.P * v.hidden_size * 2 + 2 * self.P * v.hidden_size * 2 // self.tp
        if st.llm:
            per, tr = self.text_layer_bytes()
            keep += st.llm * per
            transient = max(transient, tr)
        if st.head and self.bwd_text:
            keep += 2 * self.T * self.cfg.text.hidden_size // (self.tp if self.sp else 1)   # final norm input
        return keep, transient

    def head_workspace_bytes(self) -> int:
        """The fused linear cross-entropy of one micro-batch (the last stage runs one at a time): its
        input (the norm output, gathered over SP) and the input gradient [T, H], the LM-head gradient
        [V/t, H] in the weight's dtype, and while it runs an fp32 [V/t, H] accumulator and a logits chunk."""
        t = self.cfg.text
        V, H = t.vocab_size // self.tp, t.hidden_size
        rows = -(-self.T // max(-(-V // H), 1))
        chunk = max(1 << max(rows - 1, 0).bit_length(), 256)     # ops.linear_cross_entropy.default_chunk_size
        trains = self.trainable["text_decoder"]
        dweight = (2 + 4) * V * H if trains else 0
        dhidden = 2 * self.T * H if self.bwd_text else 0
        return 2 * self.T * H + dhidden + dweight + 4 * min(chunk, self.T) * V

    # -- FLOPs (one micro-batch on one rank) --

    def _mult(self, trains: bool, backward: bool, recompute: bool) -> float:
        """Forward multiples for linears: 3 trained, 2 when only the input gradient flows, 1 forward only;
        +1 when recomputed."""
        base = 3.0 if trains else 2.0 if backward else 1.0
        return base + (1.0 if recompute and backward else 0.0)

    def stage_flops(self, st: VirtualStage) -> float:
        t, v = self.cfg.text, self.cfg.vision
        tp, f = self.tp, 0.0
        if st.vit or st.patch_embed:
            mult = self._mult(self.trainable["vision_encoder"], self.bwd_vit, self.rc_vision == "full")
            full_blocks = len(v.fullatt_block_indexes)
            frame = min(self.P, FRAME_PATCHES_MAX)
            window = (v.window_size // v.patch_size) ** 2
            attn_fwd = 4 * v.hidden_size * self.P * (full_blocks * frame + (v.depth - full_blocks) * min(window, frame))
            attn_fwd /= v.depth * self.cp                    # CP: every row of heads/cp heads
            block = self.units["vit_block"][0] * 2 * self.Pb
            f += st.vit * (block * mult + attn_fwd / tp * (3 if self.bwd_vit else 1))
            if st.patch_embed:
                f += 2 * self.units["patch_embed"][0] * self.P * mult
        if st.merger:
            mult = self._mult(self.trainable["projector"], self.bwd_merger, False)
            f += 2 * self.units["merger"][0] * self.G * mult
        if st.llm:
            mult = self._mult(self.trainable["text_decoder"], self.bwd_text, self.rc_text == "full")
            attn_fwd = 2 * self.S * self.S * t.hidden_size / (tp * self.cp)     # causal: half of 4·S²·H
            f += st.llm * (2 * self.units["decoder_layer"][0] * self.T * mult
                           + attn_fwd * (3 + (1 if self.rc_text == "full" else 0) if self.bwd_text else 1))
        if st.head:
            f += 6 * self.units["lm_head"][0] * self.T        # the loss op computes both gradients in forward
        return f

    def model_flops_per_microbatch(self) -> float:
        """mmfuse/train/metrics.py's definition, for one micro-batch of the whole model."""
        t, v = self.cfg.text, self.cfg.vision
        p = model_params(self.cfg)
        text = p["decoder"] + t.hidden_size + t.vocab_size * t.hidden_size   # final norm; the LM head, tied or not
        f = 6 * text * self.S + 6 * self.S ** 2 * t.hidden_size * t.num_hidden_layers
        if self.P:
            full_blocks = len(v.fullatt_block_indexes)
            frame = min(self.P, FRAME_PATCHES_MAX)
            window = (v.window_size // v.patch_size) ** 2
            f += 6 * (p["vit"] + p["merger"]) * self.P
            f += 12 * v.hidden_size * (full_blocks * self.P * frame + (v.depth - full_blocks) * self.P * window)
        return f

    # -- communication (bytes one rank sends, one micro-batch unless said) --

    def tp_bytes(self, st: VirtualStage) -> int:
        if self.tp == 1:
            return 0
        t, v = self.cfg.text, self.cfg.vision
        share = (self.tp - 1) / self.tp
        S_t = 2 * self.T * t.hidden_size                 # one full hidden tensor of the decoder
        S_v = 2 * self.P * v.hidden_size
        S_vb = 2 * self.Pb * v.hidden_size               # the rows of one CP rank's ViT blocks
        b = 0.0
        if st.llm:
            fwd = 4 * S_t * share                        # SP: 2 all-gathers + 2 reduce-scatters; else 2 all-reduces
            bwd = (6 if self.sp else 4) * S_t * share if self.bwd_text else 0
            if self.rc_text == "full" and self.bwd_text:
                fwd *= 2
            b += st.llm * (fwd + bwd)
        if st.vit:
            fwd = 4 * S_vb * share                       # as the decoder's: SP all-gathers/reduce-scatters
            bwd = (6 if self.sp else 4) * S_vb * share if self.bwd_vit else 0
            if self.rc_vision == "full" and self.bwd_vit:
                fwd *= 2
            b += st.vit * (fwd + bwd)
        if st.merger:
            b += 2 * (2 * self.G * v.out_hidden_size) * share
            if self.bwd_vit:
                b += 2 * S_v * share
            if self.sp:
                b += S_vb * share                        # all-gather of the patches (its backward slices)
        if st.embed:   # vocab-parallel lookup: reduce-scatter (SP) or all-reduce; the gradient is gathered back
            b += S_t * share if self.sp else 2 * S_t * share
            b += S_t * share if self.sp and self.trainable["text_decoder"] else 0
        if st.head:
            b += 2 * S_t * share if self.sp else 0       # gather before the loss, reduce-scatter its gradient
            b += 3 * 2 * 4 * self.T * share              # vocab-parallel max, sum-exp and target logit (fp32)
        return int(b)

    def cp_bytes(self, st: VirtualStage) -> int:
        return self.cp_text_bytes(st) + self.cp_vision_bytes(st)

    def cp_text_bytes(self, st: VirtualStage) -> int:
        if self.cp == 1 or not st.llm:
            return 0
        t, T, tp, cp = self.cfg.text, self.T, self.tp, self.cp
        passes = (2 if self.rc_text == "full" else 1)
        if self.layout.cp_kind == "ring":
            kv_block = 2 * T * 2 * self.kv // tp         # this rank's K and V
            per_layer = (cp - 1) * kv_block * (passes + (2 if self.bwd_text else 0))   # backward: K/V again + dK/dV
        else:
            kv = max(t.num_key_value_heads // tp, cp) * t.head_dim      # K/V heads replicated up to cp
            local = 2 * T * (2 * t.hidden_size // tp + 2 * kv)          # q, out, k, v on this rank
            per_layer = (cp - 1) / cp * local * (passes + (1 if self.bwd_text else 0))
        return int(st.llm * per_layer)

    def cp_vision_bytes(self, st: VirtualStage) -> int:
        """The ViT blocks' Ulysses all-to-alls (both cp kinds) and the all-gather of the rows before
        the merger (its backward a reduce-scatter); none of it hides behind compute."""
        if self.cp == 1:
            return 0
        share = (self.cp - 1) / self.cp
        D = self.cfg.vision.hidden_size
        b = 0.0
        if st.vit:
            local = 2 * self.Pb * D // self.tp           # one of q, k, v, out on this rank (bf16)
            passes = 2 if self.rc_vision == "full" and self.bwd_vit else 1
            b += st.vit * 4 * share * local * (passes + (1 if self.bwd_vit else 0))
        if st.merger:
            rows = 2 * self.Pb * D // (self.tp if self.sp else 1)      # what each rank contributes
            b += (self.cp - 1) * rows * (2 if self.bwd_vit else 1)
        return int(b)

    def boundary_bytes(self, kind: str) -> int:
        t, v = self.cfg.text, self.cfg.vision
        if kind == "hidden":
            return 2 * self.T * t.hidden_size // (self.tp if self.sp else 1)
        if kind == "merged":
            return 2 * self.G * v.out_hidden_size
        if kind == "vit":
            return 2 * self.Pb * v.hidden_size // (self.tp if self.sp else 1)
        return 0

    def boundary_has_grad(self, kind: str) -> bool:
        return {"hidden": self.bwd_text, "merged": self.bwd_merger, "vit": self.bwd_vit}.get(kind, False)

    def decoder_attention_flops(self, layers: int) -> float:
        """Forward + backward attention FLOPs of `layers` decoder layers, one micro-batch, one rank
        (what ring CP's K/V passing can hide behind)."""
        return layers * 3 * 2 * self.S ** 2 * self.cfg.text.hidden_size / (self.tp * self.cp)


def spans_nodes(layout: ParallelLayout, world: int, per_node: int) -> dict[str, bool]:
    """Whether any group of each kind holds ranks of two nodes (rank = t + tp·(c + cp·(d + dp·p)))."""
    tp, cp, pp, dp = layout.tp, layout.cp, layout.pp, layout.dp(world)
    rank = lambda t, c, d, p: t + tp * (c + cp * (d + dp * p))  # noqa: E731
    node = lambda r: r // per_node  # noqa: E731
    out = {}
    # The extreme members of each group are enough: ranks grow monotonically with each coordinate.
    out["tp"] = any(node(rank(0, c, d, p)) != node(rank(tp - 1, c, d, p))
                    for c in range(cp) for d in range(dp) for p in range(pp))
    out["cp"] = any(node(rank(t, 0, d, p)) != node(rank(t, cp - 1, d, p))
                    for t in range(tp) for d in range(dp) for p in range(pp))
    out["dp_cp"] = any(node(rank(t, 0, 0, p)) != node(rank(t, cp - 1, dp - 1, p)) for t in range(tp) for p in range(pp))
    out["pp"] = any(node(rank(t, c, d, p)) != node(rank(t, c, d, p + 1))
                    for t in range(tp) for c in range(cp) for d in range(dp) for p in range(pp - 1))
    return out
