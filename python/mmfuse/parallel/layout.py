"""The parallel layout of a run (TP, PP, VPP, CP, DP and their options), checked against the world
size and the model before any process-group work, so an impossible layout fails in a second with a
message that says which number does not fit and how to fix it.

Rank order (Megatron's default, tp fastest): rank = tp_rank + tp·(cp_rank + cp·(dp_rank + dp·pp_rank)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CP_KINDS = ("ring", "ulysses")


@dataclass
class ParallelLayout:
    """How the ranks of a run are split; DP is what is left: world / (tp·pp·cp)."""
    tp: int = 1                      # tensor parallel size (linears split across ranks)
    pp: int = 1                      # pipeline stages
    vpp: int = 1                     # model chunks per pipeline rank (interleaved 1F1B when > 1)
    cp: int = 1                      # context parallel size (each sample's tokens split across ranks)
    cp_kind: str = "ring"            # ring (K/V passed around, causal load-balanced) | ulysses (all-to-all over heads)
    sequence_parallel: bool = True   # with tp > 1: norms and residuals hold T/tp tokens per rank
    tp_overlap_chunks: int = 0       # > 1 (with SP): all-gather / reduce-scatter in this many chunks beside the GEMMs
    vit_pp_layers: list[int] = field(default_factory=list)  # ViT blocks per virtual stage (pp·vpp entries; [] = even)
    llm_pp_layers: list[int] = field(default_factory=list)  # decoder layers per virtual stage (pp·vpp entries; [] = even)
    zero1: bool = False              # shard optimizer state over data-parallel ranks (distributed optimizer)
    overlap_grad_reduce: bool = True  # reduce gradient buckets during backward
    overlap_p2p_comm: bool = True    # pp > 1: post pipeline receives ahead of their use (same results)
    bucket_mb: float = 25.0          # gradient bucket size for the data-parallel reduction
    timeout_s: float = 600.0         # collective timeout: a failed or stuck rank ends the run after this

    def dp(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp * self.cp)

    def validate(self, world_size: int, model_cfg: Any | None = None) -> None:
        """ValueError naming the first thing that cannot work. model_cfg: a Qwen2_5_VLConfig (optional)."""
        for name in ("tp", "pp", "vpp", "cp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel.{name} must be an integer >= 1, got {value!r}")
        if self.cp_kind not in CP_KINDS:
            raise ValueError(f"parallel.cp_kind must be one of {', '.join(CP_KINDS)}, got {self.cp_kind!r}")
        if self.vpp > 1 and self.pp == 1:
            raise ValueError(f"parallel.vpp = {self.vpp} needs pipeline parallelism (pp > 1)")
        if not isinstance(self.tp_overlap_chunks, int) or self.tp_overlap_chunks < 0:
            raise ValueError(f"parallel.tp_overlap_chunks must be an integer >= 0 (0 or 1: no overlap), "
                             f"got {self.tp_overlap_chunks!r}")
        if self.tp_overlap_chunks > 1 and not (self.tp > 1 and self.sequence_parallel):
            raise ValueError(f"parallel.tp_overlap_chunks = {self.tp_overlap_chunks} overlaps sequence-parallel "
                             f"collectives: it needs tp > 1 with sequence_parallel (tp = {self.tp}, "
                             f"sequence_parallel = {self.sequence_parallel})")
        if self.bucket_mb <= 0 or self.timeout_s <= 0:
            raise ValueError("parallel.bucket_mb and parallel.timeout_s must be > 0")
        per_replica = self.tp * self.pp * self.cp
        if world_size < 1 or world_size % per_replica:
            raise ValueError(f"world size {world_size} is not divisible by tp·pp·cp = {self.tp}·{self.pp}·{self.cp} "
                             f"= {per_replica}; launch a multiple of {per_replica} processes (e.g. torchrun "
                             f"--nproc-per-node {per_replica} -m mmfuse train ...) or change the layout")
        if model_cfg is not None:
            self._validate_model(model_cfg)

    def _validate_model(self, cfg: Any) -> None:
        text, vision = cfg.text, cfg.vision
        checks = [
            (text.num_attention_heads, "text num_attention_heads"),
            (text.num_key_value_heads, "text num_key_value_heads"),
            (text.intermediate_size, "text intermediate_size"),
            (vision.num_heads, "vision num_heads"),
            (vision.intermediate_size, "vision intermediate_size"),
        ]
        for value, what in checks:
            if value % self.tp:
                raise ValueError(f"parallel.tp = {self.tp} does not divide the model's {what} ({value}); "
                                 f"choose tp among the common divisors")
        if text.vocab_size % self.tp:
            raise ValueError(f"parallel.tp = {self.tp} does not divide vocab_size {text.vocab_size}")
        if self.cp > 1 and self.cp_kind == "ulysses" and (text.num_attention_heads // self.tp) % self.cp:
            raise ValueError(f"Ulysses context parallelism splits attention heads: cp = {self.cp} must divide the "
                             f"query heads per tensor-parallel rank ({text.num_attention_heads // self.tp})")
        if self.cp > 1 and (vision.num_heads // self.tp) % self.cp:
            raise ValueError(f"context parallelism splits the vision attention's heads (an all-to-all, for both "
                             f"cp kinds): cp = {self.cp} must divide the vision heads per tensor-parallel rank "
                             f"({vision.num_heads // self.tp})")
        self.stage_layers(cfg)

    def stage_layers(self, cfg: Any) -> tuple[list[int], list[int]]:
        """(vit, llm) layer counts per virtual stage, in pipeline order (virtual stage v = chunk·pp + rank),
        checked with MindSpeed-MM's rules."""
        stages = self.pp * self.vpp
        vit = _split(self.vit_pp_layers, cfg.vision.depth, stages, "vit_pp_layers", "ViT depth", fill_first=True)
        llm = _split(self.llm_pp_layers, cfg.text.num_hidden_layers, stages, "llm_pp_layers",
                     "decoder layers (num_hidden_layers)", fill_first=False)
        last_vit = max((i for i, n in enumerate(vit) if n), default=-1)
        first_llm = min((i for i, n in enumerate(llm) if n), default=stages)
        if last_vit > first_llm:
            raise ValueError(f"pipeline split puts ViT layers after decoder layers (vit_pp_layers {vit}, "
                             f"llm_pp_layers {llm}); all ViT blocks must come before the first decoder layer")
        if stages > 1 and llm[-1] == 0:
            raise ValueError(f"the last pipeline stage must hold decoder layers (llm_pp_layers {llm}): it computes "
                             "the loss after the final norm")
        return vit, llm


def _split(given: list[int], total: int, stages: int, name: str, what: str, fill_first: bool) -> list[int]:
    if given:
        flat = [int(n) for n in (_flatten(given))]
        if len(flat) != stages:
            raise ValueError(f"parallel.{name} has {len(flat)} entries but pp·vpp = {stages} virtual stages")
        if any(n < 0 for n in flat):
            raise ValueError(f"parallel.{name} {flat}: layer counts must be >= 0")
        if sum(flat) != total:
            raise ValueError(f"parallel.{name} {flat} sums to {sum(flat)}, but the model has {total} {what}")
        return flat
    if stages == 1:
        return [total]
    if fill_first:
        # The ViT (much smaller than the decoder in every released size) goes to the first stage, as in
        # MindSpeed-MM's recipes (e.g. vit_pp_layers [32, 0] for 7B on pp2).
        return [total] + [0] * (stages - 1)
    base, extra = divmod(total, stages)
    if base == 0:
        raise ValueError(f"{total} {what} cannot give every one of {stages} pipeline stages a layer; "
                         f"use fewer stages or set parallel.{name}")
    return [base + (1 if i >= stages - extra else 0) for i in range(stages)]


def _flatten(v: list[Any]) -> list[Any]:
    """MindSpeed-MM writes VPP splits as nested lists (outer = chunk, inner = stage): [[1, 2], [2, 1]]."""
    out: list[Any] = []
    for x in v:
        out.extend(_flatten(x) if isinstance(x, (list, tuple)) else [x])
    return out
