"""Pipeline bubble on the CPU: one step of pp2 1F1B and of pp2 with vpp2 (interleaved 1F1B) on two
gloo ranks (two vpp2 splits), against the compute each rank would do with no waiting.

  stage compute   each virtual stage's forward + backward over the step's micro-batches, timed in
                  one process with the stages chained (no communication), one thread as each rank
  ideal step      max over ranks of the summed compute of its stages (the busiest rank never waits)
  step            forward_backward + tied-embedding sync on the ranks, barrier to barrier, p50, with
                  overlapped p2p (receives posted ahead, parallel.overlap_p2p_comm) in the tagged
                  protocol (gloo's), in the ordered one (Megatron's matched exchanges, the one NCCL
                  and HCCL run) and without overlap; the three alternate step by step in the same
                  processes, so load drift hits all
  bubble          1 − ideal / step (time a rank spends waiting on the other, plus p2p overhead)
  textbook        (pp − 1) / (vpp·M + pp − 1): the bubble of equal stages and free communication

The model is the tiny config widened (text 256, ViT 128) with 4 ViT blocks and 4 decoder layers, so a
stage computes milliseconds, not microseconds; M = 8 micro-batches per step. Each rank runs with one
thread; on a machine with fewer free cores than ranks the ranks share cores and the step time
measures that, so the load average is recorded.

  PYTHONPATH=python:. python bench/parallel/bench_pp_bubble.py   # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    _root = Path(__file__).resolve().parents[2]
    sys.path[0] = str(_root)
    sys.path.insert(1, str(_root / "python"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench import common  # noqa: E402
from mmfuse.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig  # noqa: E402
from mmfuse.models.qwen2_5_vl.pipeline import stage_forward, stage_specs  # noqa: E402
from mmfuse.parallel import ParallelLayout  # noqa: E402
from mmfuse.parallel.pipeline_schedule import (build_pipeline_chunks, forward_backward,  # noqa: E402
                                               sync_tied_embedding_grads)
from mmfuse.parallel.state import build_state  # noqa: E402
from tests.parallel.batches import label_tokens, micro_batch  # noqa: E402
from tests.parallel.spawn import run_ranks  # noqa: E402

LAYOUTS = {
    "pp2-1f1b": dict(pp=2, vit_pp_layers=[4, 0], llm_pp_layers=[2, 2]),
    # The same layers per rank as pp2-1f1b, in chunks of roughly equal cost (ViT, 1, 2, 1 layers).
    "pp2-vpp2-same-ranks": dict(pp=2, vpp=2, vit_pp_layers=[4, 0, 0, 0], llm_pp_layers=[0, 1, 2, 1]),
    # Ranks balanced, chunks not: two cheap ViT chunks, then two decoder chunks of ~4x their cost.
    "pp2-vpp2-vit-split": dict(pp=2, vpp=2, vit_pp_layers=[2, 2, 0, 0], llm_pp_layers=[0, 0, 2, 2]),
}
# Micro-batch contents (text lengths, images): ~150–300 tokens each, one text-only.
SAMPLES = [
    [[60, ("image", (1, 8, 8)), 80]],
    [[120], [90]],
    [[40, ("image", (1, 8, 4)), 100], [30, ("image", (1, 4, 4)), 50]],
    [[150, ("image", (1, 4, 8)), 60]],
]


def model() -> Qwen2_5_VL:
    cfg = Qwen2_5_VLConfig.preset("tiny")
    cfg.text.hidden_size, cfg.text.intermediate_size, cfg.text.mrope_section = 256, 768, [8, 12, 12]
    cfg.text.num_hidden_layers = 4
    cfg.vision.hidden_size, cfg.vision.intermediate_size, cfg.vision.out_hidden_size = 128, 256, 256
    cfg.vision.depth, cfg.vision.fullatt_block_indexes = 4, [1, 3]
    torch.manual_seed(0)
    return Qwen2_5_VL(cfg)


def batches(cfg, n: int) -> list[dict]:
    return [micro_batch(cfg, SAMPLES[i % len(SAMPLES)], seed=i) for i in range(n)]


def stage_compute_ms(layout: ParallelLayout, n: int, reps: int) -> list[float]:
    """Forward + backward ms of each virtual stage over n micro-batches (p50 of reps), chained in
    one process: each stage's input is a detached copy of the previous stage's output."""
    m = model()
    specs = stage_specs(*layout.stage_layers(m.cfg))
    bs = batches(m.cfg, n)
    scale = 1.0 / sum(label_tokens(b) for b in bs)
    samples = [[] for _ in specs]
    for _ in range(reps + 1):
        spent = [0.0] * len(specs)
        for b in bs:
            x = None
            for s in specs:
                x_in = x.detach().requires_grad_() if x is not None else None
                t0 = time.perf_counter()
                y = stage_forward(m, s, b, x_in)
                y = y.loss_sum * scale if s.head else y
                if y.requires_grad:
                    y.backward(torch.ones_like(y) if not s.head else None)
                spent[s.index] += time.perf_counter() - t0
                x = y if not s.head else None
        m.zero_grad(set_to_none=True)
        for i, t in enumerate(spent):
            samples[i].append(1e3 * t)
    return [common.quantile(sorted(v[1:]), 0.5) for v in samples]   # first rep: warm-up


# (name, overlap_p2p, p2p_protocol) of the timed variants
VARIANTS = (("blocking", False, "auto"), ("tagged", True, "tagged"), ("ordered", True, "ordered"))


def _rank_steps(rank, world_size, layout_kw, n, warmup, reps) -> dict[str, list[float]]:
    torch.set_num_threads(1)
    layout = ParallelLayout(timeout_s=120, **layout_kw)
    m = model()
    state = build_state(layout, rank, world_size)
    chunks = build_pipeline_chunks(m, layout, state)
    bs = batches(m.cfg, n)
    scale = 1.0 / sum(label_tokens(b) for b in bs)
    times = {name: [] for name, _, _ in VARIANTS}
    for i in range(warmup + reps):
        for name, overlap, protocol in VARIANTS:
            m.zero_grad(set_to_none=True)
            dist.barrier(group=state.pp_group)
            t0 = time.perf_counter()
            forward_backward(chunks, bs, state, scale, overlap_p2p=overlap, p2p_protocol=protocol)
            sync_tied_embedding_grads(m, state)
            dist.barrier(group=state.pp_group)
            if i >= warmup:
                times[name].append(1e3 * (time.perf_counter() - t0))
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--micro-batches", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    env = common.environment()
    env["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    n, results = args.micro_batches, {}
    for name, kw in LAYOUTS.items():
        layout = ParallelLayout(**kw)
        stages = stage_compute_ms(layout, n, args.reps)
        per_rank = [sum(stages[c * layout.pp + r] for c in range(layout.vpp)) for r in range(layout.pp)]
        per_rank_steps = run_ranks(layout.pp, _rank_steps, kw, n, args.warmup, args.reps, timeout_s=300)
        per_step = [r["tagged"] for r in per_rank_steps]
        blocking = [max(ts) for ts in zip(*(r["blocking"] for r in per_rank_steps))]
        ordered = [max(ts) for ts in zip(*(r["ordered"] for r in per_rank_steps))]
        step = common.quantile(sorted(max(ts) for ts in zip(*per_step)), 0.5)
        step_blocking = common.quantile(sorted(blocking), 0.5)
        step_ordered = common.quantile(sorted(ordered), 0.5)
        ideal = max(per_rank)
        results[name] = {
            "layout": kw, "micro_batches": n,
            "stage_compute_ms": [round(t, 2) for t in stages],
            "rank_compute_ms": [round(t, 2) for t in per_rank],
            "ideal_step_ms": round(ideal, 2),
            "step_ms_p50": round(step, 2),
            "step_ms_all": [round(max(ts), 2) for ts in zip(*per_step)],
            "bubble": round(1 - ideal / step, 3),
            "step_ms_p50_no_overlap_p2p": round(step_blocking, 2),
            "step_ms_all_no_overlap_p2p": [round(t, 2) for t in blocking],
            "bubble_no_overlap_p2p": round(1 - ideal / step_blocking, 3),
            "overlap_p2p_speedup": round(step_blocking / step, 3),
            "step_ms_p50_ordered_overlap": round(step_ordered, 2),
            "step_ms_all_ordered_overlap": [round(t, 2) for t in ordered],
            "ordered_overlap_speedup": round(step_blocking / step_ordered, 3),
            "textbook_bubble": round((layout.pp - 1) / (layout.vpp * n + layout.pp - 1), 3),
        }
        r = results[name]
        print(f"{name}: stages {r['stage_compute_ms']} ms, ranks {r['rank_compute_ms']} ms, ideal "
              f"{r['ideal_step_ms']} ms, step p50 {r['step_ms_p50']} ms (no p2p overlap "
              f"{r['step_ms_p50_no_overlap_p2p']} ms, x{r['overlap_p2p_speedup']}; ordered overlap "
              f"{r['step_ms_p50_ordered_overlap']} ms, x{r['ordered_overlap_speedup']}), bubble {r['bubble']:.1%} "
              f"(no p2p overlap {r['bubble_no_overlap_p2p']:.1%}, textbook {r['textbook_bubble']:.1%})", flush=True)
    env["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    commit, _ = common.git_commit()
    out = args.out or common.REPO_ROOT / "bench" / "results" / (
        f"pp-bubble-{time.strftime('%Y-%m-%d', time.gmtime())}-{commit or 'nogit'}.json")
    path = common.write_json(out, {"command": " ".join(["python", *sys.argv]), "created_utc": common.utc_now(),
                                   "settings": vars(args) | {"out": str(out)},
                                   "environment": env, "results": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
