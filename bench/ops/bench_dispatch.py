"""Per-call cost of the ops on small tensors, where Python, not arithmetic, sets the time: the eager
route (ops/_eager.py) against the same op through the dispatcher (`torch.library.custom_op`), and
the tiny Qwen2.5-VL training step with the route on and off.

  chain     N calls of one op, each on the previous output, then one backward; per-call µs = time / N
            (so `.backward()`'s fixed cost is spread, as in a model); rms_norm [256, 64] also against
            `F.rms_norm`, swiglu [256, 160] against `F.silu(gate) * up`
  step      the tiny config's fwd+bwd on bench_qwen2_5_vl_step's tiny batch (2 samples, 256 tokens)

The two settings alternate rep by rep in one process, so load drift hits both. Writes
bench/results/dispatch-<date>-<commit>.json.

  PYTHONPATH=python:. python -m bench.ops.bench_dispatch        # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from bench import common
from mmfuse import ops
from mmfuse.ops import _eager

CHAIN = 50


def _chains() -> dict[str, tuple[torch.Tensor, Callable]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    w = torch.randn(64, generator=g)
    u = torch.randn(256, 160, generator=g)
    cos, sin = torch.randn(256, 16, generator=g), torch.randn(256, 16, generator=g)
    return {
        "rms_norm": (x, lambda t: ops.rms_norm(t, w)),
        "rms_norm F.rms_norm": (x, lambda t: F.rms_norm(t, (64,), w, 1e-6)),
        "swiglu": (u, lambda t: ops.swiglu(t, u)),
        "swiglu F.silu*up": (u, lambda t: F.silu(t) * u),
        "rotary": (x.reshape(256, 2, 32), lambda t: ops.rotary(t, cos, sin)),
        "attention [64, 2, 32]": (x[:64].reshape(64, 2, 32).contiguous(),
                                  lambda t: ops.attention(t, t, t, causal=True)),
    }


def _time_chain(x0: torch.Tensor, fn: Callable) -> float:
    x = x0.clone().requires_grad_(True)
    t0 = time.perf_counter()
    y = x
    for _ in range(CHAIN):
        y = fn(y)
    y.sum().backward()
    return (time.perf_counter() - t0) / CHAIN * 1e6


def _tiny_step() -> Callable[[], None]:
    from bench.models import bench_qwen2_5_vl_step as step
    from mmfuse.models.qwen2_5_vl import Qwen2_5_VLConfig

    cfg = Qwen2_5_VLConfig.preset("tiny")
    tmp = Path(tempfile.mkdtemp())
    step.write_weights(cfg, 0, tmp / "tiny")
    batch = step.build_batch(cfg, step.LAYOUTS["tiny"], 0)
    model = step.load_model(step.MMFUSE, tmp / "tiny")

    def run():
        step.loss_and_backward(step.MMFUSE, model, batch)
        step.clear_grads(model)
    return run


def _ab(fn: Callable[[], float], reps: int, warmup: int) -> dict[str, list[float]]:
    """fn() timed with the route on and off, alternating; returns the samples of each."""
    out = {"route": [], "custom_op": []}
    for i in range(warmup + reps):
        for key, on in (("route", True), ("custom_op", False)):
            previous = _eager.set_enabled(on)
            try:
                t = fn()
            finally:
                _eager.set_enabled(previous)
            if i >= warmup:
                out[key].append(t)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict = {"chain_us_per_call": {}, "tiny_step_ms": {}}
    for name, (x0, fn) in _chains().items():
        samples = _ab(lambda: _time_chain(x0, fn), args.reps, 3)
        p50 = {k: common.quantile(sorted(v), 0.5) for k, v in samples.items()}
        results["chain_us_per_call"][name] = {k: round(v, 1) for k, v in p50.items()}
        if name.startswith(("rms_norm F", "swiglu F")):   # no mmfuse op in the chain: one number
            print(f"{name:24s} {p50['custom_op']:7.1f} µs per call fwd+bwd")
        else:
            print(f"{name:24s} route {p50['route']:7.1f} µs, custom op {p50['custom_op']:7.1f} µs per call "
                  f"fwd+bwd (x{p50['custom_op'] / p50['route']:.2f})")
    run = _tiny_step()

    def timed_step() -> float:
        t0 = time.perf_counter()
        run()
        return (time.perf_counter() - t0) * 1e3
    samples = _ab(timed_step, args.reps, 3)
    p50 = {k: round(common.quantile(sorted(v), 0.5), 2) for k, v in samples.items()}
    results["tiny_step_ms"] = p50 | {"all": {k: [round(t, 2) for t in v] for k, v in samples.items()}}
    print(f"tiny step fwd+bwd: route {p50['route']} ms, custom op {p50['custom_op']} ms "
          f"(x{p50['custom_op'] / p50['route']:.2f})")
    commit, _ = common.git_commit()
    out = args.out or common.REPO_ROOT / "bench" / "results" / (
        f"dispatch-{time.strftime('%Y-%m-%d', time.gmtime())}-{commit or 'nogit'}.json")
    env = common.environment()
    path = common.write_json(out, {"command": " ".join(["python", *sys.argv]), "created_utc": common.utc_now(),
                                   "settings": vars(args) | {"out": str(out), "chain": CHAIN},
                                   "environment": env, "results": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
