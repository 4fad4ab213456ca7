"""Data parallel on two CPU gloo ranks (one thread each): a step (forward + backward + gradient
reduction) with the bucket all-reduces overlapped with backward vs all issued after it, for the
tiny and 100m Qwen2.5-VL presets.

Each rank trains on one sample shaped like the first of bench_qwen2_5_vl_step.py's batch (one
224x224 image). Per step and rank three intervals are timed:

  backward   forward + backward (with overlap it includes issuing the buckets from the hooks)
  finish     GradReducer.finish(): the reduction left exposed after backward. Without overlap this is
             all of it (copy into buckets + all-reduce + wait) and serves as the communication time.
  step       backward + finish (no optimizer: it is the same in both modes)

Both ranks get samples of the same shape (the first sample's layout, different random content), so
neither waits long for the other. A step lasts as long as its slower rank: step = max over ranks of
backward + finish, and backward and finish are those of the rank that finished backward last (the
other rank's finish also contains waiting for it). Reported numbers are medians over timed steps.
hidden = 1 - finish(overlap) / finish(no overlap): the share of the communication time that overlap
took off the critical path. The two modes alternate in rounds so a change of machine load hits
both. Load averages before and after are recorded.

With --trace DIR, one more step per mode (after the last round's timed steps, not in the medians;
--trace-steps for more) runs under torch.profiler on both ranks, with record_function ranges
forward / backward / finish; the Chrome traces go to DIR/dp-SIZE-MODE-rankR.json and comm_trace.py
measures from them the time with a gloo collective in flight (comm), the part of it the main thread
waited for (exposed) and hidden = 1 - exposed / comm. Unlike the timing above this also sees how much
of the reduction the no-overlap mode hides by itself (bucket i all-reduces while bucket i+1 is copied).

On a CPU box the ranks' compute threads and gloo's communication threads share the cores, so hidden
communication is not free: it slows backward, and the step can gain less than the hidden share
suggests (or lose), unlike GPUs where NCCL runs beside the compute kernels.

    PYTHONPATH=python:. python bench/parallel/bench_dp_overlap.py            # tiny + 100m, ~2-4 min
    PYTHONPATH=python:. python bench/parallel/bench_dp_overlap.py --sizes tiny --steps 5
    PYTHONPATH=python:. python bench/parallel/bench_dp_overlap.py --trace          # + traces in /tmp/mmfuse-traces
"""

from __future__ import annotations

import argparse
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

from bench import common  # noqa: E402
from bench.models.bench_qwen2_5_vl_step import LAYOUTS, build_batch  # noqa: E402
from bench.parallel.comm_trace import analyse_files, print_table, trace_step  # noqa: E402
from mmfuse.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig  # noqa: E402
from mmfuse.parallel.data_parallel import GradReducer  # noqa: E402
from tests.parallel.spawn import run_ranks  # noqa: E402

# The 25 MB default (ParallelLayout.bucket_mb) would put the tiny model's 0.8 MB in one bucket,
# which cannot overlap anything; 0.2 MB gives it 4.
BUCKET_MB = {"tiny": 0.2, "100m": 25.0}
STEPS = {"tiny": 20, "100m": 3}      # timed steps per mode and round; 100m: ~3 s per step here
TRACE_DIR = "/tmp/mmfuse-traces"     # 100m traces are several MB: kept out of the repository
MODES = ("no_overlap", "overlap")


def _step(model, inputs: dict, tokens: torch.Tensor, reducer: GradReducer) -> tuple[float, float]:
    """One step; returns (forward + backward, finish) in seconds."""
    t0 = time.perf_counter()
    with record_function("forward"):
        loss = model(**inputs).loss_sum / tokens
    with record_function("backward"):
        loss.backward()
    t1 = time.perf_counter()
    with record_function("finish"):
        reducer.finish()
    return t1 - t0, time.perf_counter() - t1


def _rank(rank: int, world: int, size: str, steps: int, warmup: int, rounds: int, bucket_mb: float,
          trace_dir: str | None, trace_steps: int) -> dict:
    torch.manual_seed(0)
    cfg = Qwen2_5_VLConfig.preset(size)
    model = Qwen2_5_VL(cfg)
    batch = build_batch(cfg, (LAYOUTS[size][0],), seed=rank)
    inputs = dict(batch.packed, labels=batch.labels)
    tokens = torch.tensor(float(batch.num_label_tokens))
    dist.all_reduce(tokens)
    times: dict[str, dict[str, list[float]]] = {}
    traces: dict[str, dict] = {}
    for r in range(rounds):
        for mode in MODES:
            reducer = GradReducer(model.named_parameters(), dist.group.WORLD, bucket_mb, overlap=mode == "overlap")
            rec = times.setdefault(mode, {"backward": [], "finish": []})
            for i in range(warmup + steps):
                dist.barrier()                    # both ranks start the step together
                backward_s, finish_s = _step(model, inputs, tokens, reducer)
                model.zero_grad(set_to_none=True)
                if i >= warmup:
                    rec["backward"].append(backward_s)
                    rec["finish"].append(finish_s)
            if trace_dir and r == rounds - 1:
                def traced():
                    _step(model, inputs, tokens, reducer)
                    model.zero_grad(set_to_none=True)
                traces[mode] = trace_step(traced, Path(trace_dir) / f"dp-{size}-{mode}-rank{rank}.json",
                                          steps=trace_steps)
            reducer.remove_hooks()
    grad_mb = sum(b.buffer.numel() * b.buffer.element_size() for b in reducer.buckets) / 2 ** 20
    return {"times": times, "traces": traces, "buckets": len(reducer.buckets), "grad_mb": grad_mb,
            "tokens": int(batch.packed["input_ids"].numel())}


def _summary(ranks: list[dict]) -> dict:
    out = {}
    for mode in MODES:
        per = [r["times"][mode] for r in ranks]
        n = len(per[0]["backward"])
        step = [max(p["backward"][i] + p["finish"][i] for p in per) for i in range(n)]
        last = [max(per, key=lambda p: p["backward"][i]) for i in range(n)]   # the rank that finished backward last
        out[mode] = {"step_ms": 1e3 * statistics.median(step),
                     "backward_ms": 1e3 * statistics.median([p["backward"][i] for i, p in enumerate(last)]),
                     "finish_ms": 1e3 * statistics.median([p["finish"][i] for i, p in enumerate(last)]),
                     "steps": n}
    off, on = out["no_overlap"], out["overlap"]
    out["hidden_share"] = 1 - on["finish_ms"] / off["finish_ms"]
    out["step_speedup"] = off["step_ms"] / on["step_ms"]
    if ranks[0]["traces"]:   # per mode, one entry per rank (comm_trace.CommSummary + trace path)
        out["trace"] = {mode: analyse_files([r["traces"][mode] for r in ranks]) for mode in MODES}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "100m"])
    ap.add_argument("--steps", type=int, default=None, help="timed steps per mode and round (default per size)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/dp-overlap-DATE-COMMIT.json)")
    ap.add_argument("--trace", nargs="?", const=TRACE_DIR, default=None, metavar="DIR",
                    help=f"profile one more step per mode and rank, Chrome traces to DIR (default {TRACE_DIR})")
    ap.add_argument("--trace-steps", type=int, default=1, help="steps per trace (their figures are summed)")
    args = ap.parse_args()

    load_before = os.getloadavg()
    began = time.perf_counter()
    sizes = {}
    for size in args.sizes:
        steps = args.steps or STEPS[size]
        ranks = run_ranks(2, _rank, size, steps, args.warmup, args.rounds, BUCKET_MB[size], args.trace,
                          args.trace_steps, timeout_s=600)
        sizes[size] = dict(_summary(ranks), buckets=ranks[0]["buckets"], bucket_mb=BUCKET_MB[size],
                           grad_mb=ranks[0]["grad_mb"], tokens_per_rank=[r["tokens"] for r in ranks])
    env = common.environment()
    env.update(load_average_before=[round(x, 2) for x in load_before], wall_s=round(time.perf_counter() - began, 1),
               ranks=2, threads_per_rank=1, backend="gloo")
    commit = env.get("git_commit") or "nocommit"
    payload = {"schema": "mmfuse-bench-dp-overlap/1", "command": "PYTHONPATH=python:. python " + " ".join(sys.argv),
               "environment": env, "sizes": sizes}
    path = Path(args.out) if args.out else (common.REPO_ROOT / "bench" / "results" /
                                            f"dp-overlap-{common.utc_now()[:10]}-{commit}.json")
    common.write_json(path, payload)

    print(f"dp2 gloo, 1 thread per rank; load average before {env['load_average_before']}, "
          f"after {env['load_average']}")
    print(f"{'size':6} {'grad MB':>8} {'buckets':>7} {'mode':>11} {'step ms':>9} {'bwd ms':>9} {'finish ms':>9}")
    for size, s in sizes.items():
        for mode in MODES:
            m = s[mode]
            print(f"{size:6} {s['grad_mb']:8.1f} {s['buckets']:7d} {mode:>11} {m['step_ms']:9.1f} "
                  f"{m['backward_ms']:9.1f} {m['finish_ms']:9.1f}")
        print(f"{size:6} communication hidden {100 * s['hidden_share']:.0f}%, step speedup {s['step_speedup']:.2f}x")
    if args.trace:
        print_table({size: s["trace"] for size, s in sizes.items()},
                    "profiled step (one per mode and rank): gloo collective in flight = comm, "
                    "main thread waiting for it = exposed")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
