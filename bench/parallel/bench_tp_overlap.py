"""Tensor parallel + sequence parallel with and without the chunked collective/GEMM overlap
(parallel/tp_overlap.py): one training step (forward + backward of the summed loss) of Qwen2.5-VL on
tp2, two gloo CPU ranks with one compute thread each.

Both variants are built from the same weights in the same process group and timed alternately, rep
by rep (a barrier before each step), so a change in machine load hits both alike. The step time is
the slower rank's (max over ranks), median over reps; losses of the two variants must agree.

With --trace DIR, after the timed reps each variant runs one more step (--trace-steps for more)
under torch.profiler on both ranks, with record_function ranges forward / backward; the Chrome traces
go to DIR/tp-SIZE-VARIANT-rankR.json and comm_trace.py measures from them the time with a TP
collective in flight (comm: the SP all-gathers / reduce-scatters, the vocabulary all-reduces), the
part of it the main thread waited for (exposed) and hidden = 1 - exposed / comm.

examples:
  PYTHONPATH=python:. python bench/parallel/bench_tp_overlap.py --sizes tiny      # seconds
  PYTHONPATH=python:. python bench/parallel/bench_tp_overlap.py                   # tiny + 100m
  PYTHONPATH=python:. python bench/parallel/bench_tp_overlap.py --trace           # + traces in /tmp/mmfuse-traces
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    _root = Path(__file__).resolve().parents[2]
    sys.path[0] = str(_root)
    sys.path.insert(1, str(_root / "python"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.profiler import record_function  # noqa: E402

from bench.common import environment, git_commit, utc_now, write_json  # noqa: E402
from bench.parallel.comm_trace import analyse_files, print_table, trace_step  # noqa: E402
from tests.parallel.spawn import run_ranks  # noqa: E402  (spawned gloo ranks, 1 thread each)

# Packed text-only micro-batches: the ViT runs without SP (no overlap there), so the decoder is what
# the comparison is about. Lengths per preset keep a 100m step around a second on one thread.
TOKENS = {"tiny": 256, "100m": 512}
SAMPLES = 4
TRACE_DIR = "/tmp/mmfuse-traces"


def _batch(cfg, tokens: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.text.vocab_size - 16, (tokens,), generator=gen)
    cu = torch.linspace(0, tokens, SAMPLES + 1).round().to(torch.int32)
    return {"input_ids": ids, "labels": ids.clone(), "cu_seqlens": cu}


def _step(model, spec, batch, tf):
    """Forward + backward of the summed loss."""
    from mmfuse.models.qwen2_5_vl.pipeline import stage_forward

    with record_function("forward"):
        out = stage_forward(model, spec, batch, None, tf)
    with record_function("backward"):
        out.loss_sum.backward()
    return out


def _rank(rank, world, size, chunks, warmup, reps, trace_dir=None, trace_steps=1):
    from mmfuse.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig
    from mmfuse.models.qwen2_5_vl.parallelize import apply_tensor_parallel
    from mmfuse.models.qwen2_5_vl.pipeline import stage_specs
    from mmfuse.parallel.sequence_parallel import SequenceParallelTransforms

    group = dist.new_group(list(range(world)))
    torch.manual_seed(0)
    base = Qwen2_5_VL(Qwen2_5_VLConfig.preset(size))
    spec = stage_specs([base.cfg.vision.depth], [base.cfg.text.num_hidden_layers])[0]
    models = {"no_overlap": apply_tensor_parallel(copy.deepcopy(base), group, True, overlap_chunks=0),
              f"overlap_{chunks}": apply_tensor_parallel(base, group, True, overlap_chunks=chunks)}
    tf = SequenceParallelTransforms(group)
    batch = _batch(base.cfg, TOKENS[size], seed=1)
    times = {k: [] for k in models}
    losses = {}
    for i in range(warmup + reps):
        for name, model in models.items():
            for p in model.parameters():
                p.grad = None
            dist.barrier(group)
            t0 = time.perf_counter()
            out = _step(model, spec, batch, tf)
            dt = torch.tensor(time.perf_counter() - t0)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX, group=group)   # the step ends when the slower rank does
            losses[name] = float(out.loss_sum.detach())
            if i >= warmup:
                times[name].append(float(dt) * 1e3)
    traces = {}
    for name, model in (models.items() if trace_dir else ()):
        def traced(model=model):
            for p in model.parameters():
                p.grad = None
            _step(model, spec, batch, tf)
        traces[name] = trace_step(traced, Path(trace_dir) / f"tp-{size}-{name}-rank{rank}.json", group, trace_steps)
    return {"times_ms": times, "losses": losses, "tokens": TOKENS[size], "traces": traces}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "100m"], choices=sorted(TOKENS))
    ap.add_argument("--chunks", type=int, default=4, help="token chunks per overlapped linear")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/tp-overlap-<date>-<commit>.json)")
    ap.add_argument("--trace", nargs="?", const=TRACE_DIR, default=None, metavar="DIR",
                    help=f"profile one more step per variant and rank, Chrome traces to DIR (default {TRACE_DIR})")
    ap.add_argument("--trace-steps", type=int, default=1, help="steps per trace (their figures are summed)")
    args = ap.parse_args()

    load_before = os.getloadavg()
    results = {}
    for size in args.sizes:
        ranks = run_ranks(2, _rank, size, args.chunks, args.warmup, args.reps, args.trace, args.trace_steps,
                          timeout_s=600.0)
        res = ranks[0]
        losses = list(res["losses"].values())
        if abs(losses[0] - losses[1]) > 1e-4 * abs(losses[0]):
            raise SystemExit(f"{size}: overlap changed the loss: {res['losses']}")
        med = {k: statistics.median(v) for k, v in res["times_ms"].items()}
        base, ov = med["no_overlap"], med[f"overlap_{args.chunks}"]
        results[size] = {"tokens": res["tokens"], "step_ms_p50": med, "step_ms_all": res["times_ms"],
                         "speedup": round(base / ov, 3), "loss": losses[0]}
        if args.trace:   # per variant, one entry per rank (comm_trace.CommSummary + trace path)
            results[size]["trace"] = {k: analyse_files([r["traces"][k] for r in ranks]) for k in res["traces"]}
        print(f"{size:>5} T={res['tokens']}: no overlap {base:8.1f} ms   overlap({args.chunks}) {ov:8.1f} ms   "
              f"x{base / ov:.3f}")
    if args.trace:
        print_table({size: r["trace"] for size, r in results.items()},
                    "profiled step (one per variant and rank): TP collective in flight = comm, "
                    "main thread waiting for it = exposed")
    commit, _ = git_commit()
    payload = {"benchmark": "tp_overlap", "layout": "tp2 + sequence parallel, gloo CPU, 1 thread per rank",
               "chunks": args.chunks, "warmup": args.warmup, "reps": args.reps, "trace_steps": args.trace_steps
               if args.trace else 0, "command": "PYTHONPATH=python:. python " + " ".join(sys.argv), "results": results,
               "load_average_before": [round(x, 2) for x in load_before],
               "load_average_after": [round(x, 2) for x in os.getloadavg()], "environment": environment()}
    out = args.out or f"bench/results/tp-overlap-{utc_now()[:10]}-{commit}.json"
    print("wrote", write_json(out, payload))


if __name__ == "__main__":
    main()
