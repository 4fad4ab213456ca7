"""Memory and throughput model of Qwen2.5-VL training under a parallel layout: parameters and bytes
per rank, activation memory at the pipeline's peak, bubble, communication per step and an estimated
step time. Pure arithmetic on the model config (no torch, no process groups), so `mmfuse plan` answers
"does this layout fit, and what will it cost" before anything is launched. The per-unit formulas
(parameters, activations, FLOPs, collective bytes) and their sources are in `costs.py`.

- Pipeline peak: 1F1B stage r keeps min(pp − r, m) micro-batches in flight; interleaved keeps the first
  min(2(pp − r − 1) + (vpp − 1)·pp + 1, m·vpp) chunk forwards of Megatron's order (chunk = i // pp % vpp).
- Bubble: (pp − 1) / (m·vpp + pp − 1).
- Time: compute at `compute_efficiency` of `peak_tflops` on the slowest stage; TP, Ulysses and p2p
  exposed; ring CP hidden behind attention; gradient reduction hidden behind the last micro-batch's
  backward when overlapped; ZeRO-1's weight all-gather after the step exposed. An estimate to compare
  layouts with, not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmfuse.parallel.costs import (GROUPS, PARTS, RECOMPUTE, Costs, Hardware, VirtualStage, model_params,  # noqa: F401
                                   unit_params, virtual_stages)
from mmfuse.parallel.layout import ParallelLayout

GiB = 1024 ** 3


@dataclass
class StagePlan:
    """One pipeline rank; every tensor/context/data-parallel rank of it holds the same amounts."""
    pp_rank: int
    virtual_stages: list[int]                 # pipeline order v = chunk·pp + pp_rank
    vit_layers: int
    llm_layers: int
    params: dict[str, int]                    # held by one rank, by part (PARTS)
    params_tp_replicated: int                 # of those, held in full by every TP rank (norms, row biases, patch embed)
    trainable_params: int
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes_per_microbatch: int      # all this rank's chunks, one micro-batch
    inflight: float                           # micro-batches whose activations are held at the peak
    activation_bytes: int                     # at the peak
    workspace_bytes: int                      # loss head (fp32 LM-head gradient, input gradient, logits chunk)
    reserve_bytes: int
    compute_flops: float                      # per step on one rank (recompute and frozen parts included)
    comm_bytes: dict[str, int]                # bytes this rank sends per step: tp, cp, pp, dp
    comm_seconds: dict[str, float]            # exposed seconds per step, by kind
    device_bytes: int

    @property
    def params_total(self) -> int:
        return sum(self.params.values())

    @property
    def total_bytes(self) -> int:
        return (self.weight_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes
                + self.workspace_bytes + self.reserve_bytes)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.device_bytes


@dataclass
class PlanReport:
    """What `plan` returns: per-stage memory, and the step's bubble, communication and time."""
    model: str
    layout: ParallelLayout
    world_size: int
    dp: int
    seq_length: int
    micro_batches: int
    image_tokens: int
    image_patches: int
    recompute_text: str
    recompute_vision: str
    frozen: tuple[str, ...]
    device_gib: float
    hardware: Hardware
    total_params: int
    stages: list[StagePlan]
    bubble: float                   # (pp − 1) / (m·vpp + pp − 1)
    tokens_per_step: int            # seq_length · micro_batches · dp
    compute_seconds: float          # the slowest stage's compute + exposed TP/CP/p2p, per step
    step_seconds: float             # compute_seconds / (1 − bubble) + exposed DP and ZeRO-1 gathers
    model_flops_per_step: float     # `mmfuse train`'s MFU definition (mmfuse/train/metrics.py)
    spans_nodes: dict[str, bool]    # which groups cross a node boundary
    notes: list[str] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    @property
    def peak_stage(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.total_bytes)

    @property
    def tokens_per_second_per_device(self) -> float:
        return self.tokens_per_step / self.step_seconds / self.world_size

    @property
    def mfu(self) -> float:
        return self.model_flops_per_step / (self.step_seconds * self.world_size * self.hardware.peak_tflops * 1e12)

    def comm_bytes(self, kind: str) -> int:
        """The busiest rank's bytes of one kind per step."""
        return max(s.comm_bytes[kind] for s in self.stages)


# ---- the plan ----------------------------------------------------------------------------------

def plan(cfg: Any, layout: ParallelLayout, world_size: int, seq_length: int = 4096, micro_batches: int = 8,
         device_gib: float = 80.0, *, image_tokens: int | None = None, recompute_text: str = "none",
         recompute_vision: str = "none", frozen: tuple[str, ...] | list[str] = (), hardware: Hardware | None = None,
         model: str = "qwen2.5-vl") -> PlanReport:
    """Memory per pipeline rank and the step's cost for `cfg` (a Qwen2_5_VLConfig) under `layout`.
    seq_length: tokens per packed micro-batch (one sample assumed for the attention term); image_tokens:
    how many of them are image tokens (default a quarter); micro_batches: per optimizer step per DP rank.
    Raises ValueError for a layout that cannot run (ParallelLayout.validate) or bad arguments."""
    hw = hardware or Hardware()
    layout.validate(world_size, cfg)
    if recompute_text not in RECOMPUTE or recompute_vision not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute_text!r} / {recompute_vision!r}")
    bad = [g for g in frozen if g not in GROUPS]
    if bad:
        raise ValueError(f"unknown frozen groups {bad}; choose from {list(GROUPS)}")
    if seq_length < 1 or micro_batches < 1:
        raise ValueError(f"seq_length and micro_batches must be >= 1, got {seq_length}, {micro_batches}")
    image_tokens = seq_length // 4 if image_tokens is None else image_tokens
    if not 0 <= image_tokens <= seq_length:
        raise ValueError(f"image_tokens must be between 0 and seq_length ({seq_length}), got {image_tokens}")

    c = Costs(cfg, layout, world_size, seq_length, image_tokens, recompute_text, recompute_vision, frozen, hw)
    vit, llm = layout.stage_layers(cfg)
    vstages = virtual_stages(vit, llm)
    pp, vpp, m = layout.pp, layout.vpp, micro_batches
    stages = []
    for r in range(pp):
        ids = list(range(r, pp * vpp, pp))                 # virtual stages of pipeline rank r
        received = [vstages[v - 1].out if v else "" for v in ids]
        stages.append(_stage_plan(c, r, [vstages[v] for v in ids], ids, received, m, device_gib))
    bubble = (pp - 1) / (m * vpp + pp - 1)
    per_stage = [s.compute_flops / c.flops_per_s + s.comm_seconds["tp"] + s.comm_seconds["cp"]
                 + s.comm_seconds["pp"] for s in stages]
    compute_s = max(per_stage)
    step_s = compute_s / (1 - bubble) + max(s.comm_seconds["dp"] for s in stages)
    report = PlanReport(
        model=model, layout=layout, world_size=world_size, dp=layout.dp(world_size), seq_length=seq_length,
        micro_batches=m, image_tokens=image_tokens, image_patches=c.P, recompute_text=recompute_text,
        recompute_vision=recompute_vision, frozen=tuple(frozen), device_gib=device_gib, hardware=hw,
        total_params=sum(model_params(cfg).values()), stages=stages, bubble=bubble,
        tokens_per_step=seq_length * m * layout.dp(world_size), compute_seconds=compute_s, step_seconds=step_s,
        model_flops_per_step=c.model_flops_per_microbatch() * m * layout.dp(world_size),
        spans_nodes=c.spans, assumptions=ASSUMPTIONS)
    report.notes = _notes(report, c)
    return report


ASSUMPTIONS = [
    "bytes/trainable parameter: 18 (bf16 weight, fp32 grad, fp32 master, Adam m and v); ZeRO-1: 6 + 12/(dp·cp); "
    "frozen: 2",
    "activations: what this model's ops save for backward (formulas in mmfuse/parallel/costs.py); the fused "
    "attention keeps no T² tensor; with SP the linears re-gather their input in backward",
    "one sample per micro-batch for the attention FLOPs; the images of a micro-batch as one image",
    "the vision tower runs on every context-parallel rank (only decoder tokens are split by CP)",
    "time: compute at compute_efficiency × peak; TP, Ulysses and p2p exposed; ring CP hidden behind attention; "
    "gradient reduction hidden behind the last micro-batch's backward when overlap_grad_reduce",
]


def _stage_plan(c: Costs, r: int, chunks: list[VirtualStage], vstage_ids: list[int], inputs: list[str], m: int,
                device_gib: float) -> StagePlan:
    """Pipeline rank r from its chunks; inputs: what each chunk receives (the previous virtual stage's
    `out`, "" for the first)."""
    layout, hw, u = c.layout, c.hw, c.units
    params = dict.fromkeys(PARTS, 0)
    replicated = 0
    tied_copy = c.cfg.text.tie_word_embeddings and not any(st.embed for st in chunks)
    for st in chunks:
        parts = [("vit", "vit_block", st.vit), ("vit", "patch_embed", int(st.patch_embed)),
                 ("merger", "merger", int(st.merger)), ("embed", "embed", int(st.embed)),
                 ("decoder", "decoder_layer", st.llm), ("head", "final_norm", int(st.head))]
        if st.head and (not c.cfg.text.tie_word_embeddings or tied_copy):
            parts.append(("head", "lm_head", 1))     # untied, or the tied copy on the last stage
        for part, unit, n in parts:
            params[part] += n * u[unit][0]
            replicated += n * u[unit][1]
    trainable = ((params["vit"] if c.trainable["vision_encoder"] else 0)
                 + (params["merger"] if c.trainable["projector"] else 0)
                 + (params["embed"] + params["decoder"] + params["head"] if c.trainable["text_decoder"] else 0))
    total = sum(params.values())
    weight_b = 2 * total
    grad_b = 4 * trainable
    optim_b = 12 * trainable // (c.dp_cp if layout.zero1 else 1)

    acts = [c.stage_activation_bytes(st) for st in chunks]
    per_mb = sum(k for k, _ in acts)
    pp, vpp = layout.pp, layout.vpp
    if pp == 1:
        order = [0]
    elif vpp == 1:
        order = [0] * min(pp - r, m)
    else:
        n = min(2 * (pp - r - 1) + (vpp - 1) * pp + 1, m * vpp)
        order = [(i // pp) % vpp for i in range(n)]
    act_b = sum(acts[k][0] for k in order) + max(tr for _, tr in acts)
    inflight = len(order) / vpp if pp > 1 else 1.0
    work_b = c.head_workspace_bytes() if any(st.head for st in chunks) else 0

    flops = m * sum(c.stage_flops(st) for st in chunks)
    comm = {"tp": m * sum(c.tp_bytes(st) for st in chunks),
            "cp": m * sum(c.cp_bytes(st) for st in chunks), "pp": 0, "dp": 0}
    for st, received in zip(chunks, inputs):
        comm["pp"] += m * c.boundary_bytes(st.out)                      # forward send
        if c.boundary_has_grad(received):
            comm["pp"] += m * c.boundary_bytes(received)                # its gradient, sent back
    d = c.dp_cp
    share = (d - 1) / d
    if layout.zero1:
        comm["dp"] = int(4 * trainable * share + 2 * trainable * share)    # reduce-scatter fp32, all-gather bf16
    else:
        comm["dp"] = int(2 * 4 * trainable * share)                         # all-reduce fp32 grads

    bw = lambda kind: (hw.inter_node_gbs if c.spans[kind] else hw.intra_node_gbs) * 1e9  # noqa: E731
    seconds = {"tp": comm["tp"] / bw("tp"), "pp": comm["pp"] / bw("pp"), "cp": 0.0, "dp": 0.0}
    vision_s = m * sum(c.cp_vision_bytes(st) for st in chunks) / bw("cp")    # all-to-alls: exposed
    text_s = comm["cp"] / bw("cp") - vision_s
    if layout.cp_kind == "ulysses":
        seconds["cp"] = vision_s + text_s
    else:   # K/V of the next block travel while the current block is computed
        attn = m * c.decoder_attention_flops(sum(st.llm for st in chunks))
        seconds["cp"] = vision_s + max(0.0, text_s - attn / c.flops_per_s)
    dp_s = comm["dp"] / bw("dp_cp")
    if layout.zero1:
        gather_s = 2 * trainable * share / bw("dp_cp")                     # after the step: exposed
        reduce_s = dp_s - gather_s
    else:
        gather_s, reduce_s = 0.0, dp_s
    if layout.overlap_grad_reduce:
        last_bwd = flops / m * (2 / 3) / c.flops_per_s
        reduce_s = max(0.0, reduce_s - last_bwd)
    seconds["dp"] = reduce_s + gather_s
    return StagePlan(
        pp_rank=r, virtual_stages=vstage_ids, vit_layers=sum(st.vit for st in chunks),
        llm_layers=sum(st.llm for st in chunks), params=params, params_tp_replicated=replicated,
        trainable_params=trainable, weight_bytes=weight_b, grad_bytes=grad_b, optimizer_bytes=optim_b,
        activation_bytes_per_microbatch=per_mb, inflight=inflight, activation_bytes=act_b,
        workspace_bytes=work_b, reserve_bytes=int(hw.reserve_gib * GiB), compute_flops=flops,
        comm_bytes=comm, comm_seconds=seconds, device_bytes=int(device_gib * GiB))


def _notes(r: PlanReport, c: Costs) -> list[str]:
    notes = []
    peak = r.peak_stage
    if not r.fits:
        over = [s for s in r.stages if not s.fits]
        notes.append(f"does not fit: stage {', '.join(str(s.pp_rank) for s in over)} needs "
                     f"{peak.total_bytes / GiB:.1f} GiB of {r.device_gib:g} GiB; "
                     + _advice(r))
    lay = r.layout
    if lay.vpp > 1 and r.micro_batches % lay.pp:
        notes.append(f"interleaved 1F1B runs micro-batches in groups of pp = {lay.pp}: micro_batches "
                     f"{r.micro_batches} is not a multiple")
    if lay.pp > 1 and r.micro_batches < lay.pp:
        notes.append(f"micro_batches {r.micro_batches} < pp {lay.pp}: stages idle most of the step")
    loads = [s.compute_flops for s in r.stages]
    if len(loads) > 1 and max(loads) > 1.25 * min(loads):
        notes.append(f"stage compute is unbalanced (slowest/fastest {max(loads) / min(loads):.2f}): "
                     f"try llm_pp_layers {balanced_llm_layers(c.cfg, lay, r.seq_length, r.image_tokens)}")
    for kind in ("tp", "cp"):
        if r.spans_nodes[kind] and getattr(lay, kind) > 1:
            notes.append(f"{kind} groups cross nodes (tp·cp > devices_per_node): their traffic goes over the network")
    if lay.zero1 and c.dp_cp == 1:
        notes.append("zero1 with dp·cp = 1 shards nothing")
    return notes


def _advice(r: PlanReport) -> str:
    tips = []
    if not r.layout.zero1 and r.dp * r.layout.cp > 1:
        tips.append("--zero1")
    if r.recompute_text != "full":
        tips.append("--recompute full")
    tips.append("more pp or tp, or a shorter --seq-length")
    return "try " + ", ".join(tips)


def balanced_llm_layers(cfg: Any, layout: ParallelLayout, seq_length: int,
                        image_tokens: int | None = None) -> list[int]:
    """Decoder layers per virtual stage that even out compute when the first stage also runs the vision
    tower and the last the LM head (greedy: each layer goes to the least-loaded stage; every stage
    keeps at least one layer). The ViT stays on virtual stage 0."""
    stages = layout.pp * layout.vpp
    image_tokens = seq_length // 4 if image_tokens is None else image_tokens
    plain = ParallelLayout(tp=layout.tp, cp=layout.cp, cp_kind=layout.cp_kind,
                           sequence_parallel=layout.sequence_parallel)
    c = Costs(cfg, plain, layout.tp * layout.cp, seq_length, image_tokens, "none", "none", (), Hardware())
    layer = c.stage_flops(VirtualStage(0, 1, False, False, False, False, ""))
    first = c.stage_flops(VirtualStage(cfg.vision.depth, 0, True, True, True, False, ""))
    last = c.stage_flops(VirtualStage(0, 0, False, False, False, True, ""))
    load = [0.0] * stages
    load[0] += first
    load[-1] += last
    count = [1] * stages
    for _ in range(cfg.text.num_hidden_layers - stages):
        i = min(range(stages), key=lambda k: load[k] + (count[k] + 1) * layer)
        count[i] += 1
    return count


# ---- text ----------------------------------------------------------------------------------------

def _gib(b: float) -> str:
    return f"{b / GiB:.1f}"


def _size(b: float) -> str:
    return f"{b / GiB:.2f} GiB" if b >= GiB / 10 else f"{b / 2 ** 20:.1f} MiB"


def describe_layout(layout: ParallelLayout, world_size: int) -> str:
    parts = [f"tp {layout.tp}", f"pp {layout.pp}"]
    if layout.vpp > 1:
        parts.append(f"vpp {layout.vpp}")
    parts.append(f"cp {layout.cp}" + (f" ({layout.cp_kind})" if layout.cp > 1 else ""))
    parts.append(f"dp {layout.dp(world_size)}")
    opts = []
    if layout.tp > 1:
        opts.append("SP" if layout.sequence_parallel else "no SP")
    opts.append("ZeRO-1" if layout.zero1 else "no ZeRO-1")
    return " · ".join(parts) + ", " + ", ".join(opts)


def format_plan(r: PlanReport) -> str:
    """The report as a text table (what `mmfuse plan` prints)."""
    lay, hw = r.layout, r.hardware
    trains = [g for g in GROUPS if g not in r.frozen]
    lines = [
        f"{r.model} ({r.total_params / 1e9:.2f} B parameters) on {r.world_size} devices: "
        f"{describe_layout(lay, r.world_size)}",
        f"micro-batch {r.seq_length} tokens ({r.image_tokens} image tokens = "
        f"{r.image_patches} patches), {r.micro_batches} micro-batches per step, recompute text "
        f"{r.recompute_text} / vision {r.recompute_vision}, training {', '.join(trains) or 'nothing'}",
        "",
        "memory per device (GiB)",
        f"{'stage':>5} {'vit':>4} {'llm':>4} {'params':>9} {'weights':>8} {'grads':>6} {'optim':>6} "
        f"{'activ':>6} {'(mb)':>5} {'work':>5} {'total':>6}  of {r.device_gib:g}",
    ]
    for s in r.stages:
        lines.append(
            f"{s.pp_rank:>5} {s.vit_layers:>4} {s.llm_layers:>4} {s.params_total / 1e9:>8.2f}B "
            f"{_gib(s.weight_bytes):>8} {_gib(s.grad_bytes):>6} {_gib(s.optimizer_bytes):>6} "
            f"{_gib(s.activation_bytes):>6} {s.inflight:>5.3g} {_gib(s.workspace_bytes + s.reserve_bytes):>5} "
            f"{_gib(s.total_bytes):>6}  {'fits' if s.fits else 'OVER'}")
    lines += [
        "  (mb): micro-batches whose activations the stage holds at its peak; work: loss workspace + "
        f"{hw.reserve_gib:g} GiB reserve",
        f"fits: {'yes' if r.fits else 'no'} (peak {_gib(r.peak_stage.total_bytes)} GiB on stage "
        f"{r.peak_stage.pp_rank})",
        "",
        f"pipeline bubble (pp−1)/(m·vpp+pp−1) = {lay.pp - 1}/{r.micro_batches * lay.vpp + lay.pp - 1} = "
        f"{100 * r.bubble:.1f} %",
        "communication per step, busiest rank (bytes sent):",
    ]
    where = lambda k: "across nodes" if r.spans_nodes[k] else "within a node"  # noqa: E731
    rows = [
        ("tp", "tp", "all-gather/reduce-scatter (SP) or all-reduce around each block" if lay.tp > 1 else "—"),
        ("cp", "cp", ("K/V blocks around the ring" if lay.cp_kind == "ring" else "all-to-all over heads")
         + " (ViT: all-to-all over heads, rows gathered before the merger)" if lay.cp > 1 else "—"),
        ("pp", "pp", "activations forward, gradients backward" if lay.pp > 1 else "—"),
        ("dp", "dp_cp", ("reduce-scatter fp32 gradients + all-gather bf16 weights" if lay.zero1
                         else "all-reduce fp32 gradients") + f" over dp·cp = {r.dp * lay.cp}"),
    ]
    for kind, group, what in rows:
        b = r.comm_bytes(kind)
        exposed = max(s.comm_seconds[kind] for s in r.stages)
        lines.append(f"  {kind.upper():<3} {_size(b):>11}  {what}" +
                     (f"; {where(group)}, exposed {exposed * 1e3:.0f} ms" if b else ""))
    lines += [
        "",
        f"estimate: {r.step_seconds:.2f} s per step, {r.tokens_per_step} tokens per step, "
        f"{r.tokens_per_second_per_device:,.0f} tokens/s per device, MFU {100 * r.mfu:.0f} % "
        f"(compute at {100 * hw.compute_efficiency:.0f} % of {hw.peak_tflops:g} TFLOP/s; links "
        f"{hw.intra_node_gbs:g} GB/s in a node, {hw.inter_node_gbs:g} GB/s across)",
    ]
    if r.notes:
        lines += [""] + [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def search(cfg: Any, world_size: int, seq_length: int = 4096, micro_batches: int = 8, device_gib: float = 80.0,
           *, limit: int = 5, **kwargs: Any) -> list[PlanReport]:
    """Layouts that fit on world_size devices, most estimated tokens/s per device first (tp, pp, vpp, cp over the
    divisors that validate; ZeRO-1 when dp·cp > 1; decoder layers balanced as `balanced_llm_layers`)."""
    found = []
    per_node = (kwargs.get("hardware") or Hardware()).devices_per_node
    divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
    for tp in divisors:
        for pp in divisors:
            for cp in divisors:
                if world_size % (tp * pp * cp) or tp > per_node:
                    continue
                for vpp in (1, 2) if pp > 1 else (1,):
                    layout = ParallelLayout(tp=tp, pp=pp, vpp=vpp, cp=cp,
                                            zero1=world_size // (tp * pp) > 1)
                    try:
                        layout.validate(world_size, cfg)
                        if pp > 1:
                            layout.llm_pp_layers = balanced_llm_layers(cfg, layout, seq_length,
                                                                       kwargs.get("image_tokens"))
                        rep = plan(cfg, layout, world_size, seq_length, micro_batches, device_gib, **kwargs)
                    except ValueError:
                        continue
                    if rep.fits:
                        found.append(rep)
    found.sort(key=lambda r: -r.tokens_per_second_per_device)
    return found[:limit]
