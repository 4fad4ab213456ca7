"""One training step of mmfuse's Qwen2.5-VL against transformers' Qwen2_5_VLForConditionalGeneration
(attn_implementation="sdpa"), fp32 on the CPU, on the same weights and the same samples.

A step is forward + backward of the mean next-token loss over the batch's label tokens, timed
alone (`fwd+bwd`; gradients set to None before each rep, outside the clock) and with the optimizer
(`fwd+bwd+adamw`: + `AdamW(fused=True).step()` + `zero_grad(set_to_none=True)`). Providers:

  mmfuse          the samples packed into one stream with cu_seqlens: varlen attention, fused
                  linear cross-entropy (no [T, V] logits)
  hf_per_sample   transformers, one forward + backward per sample (batch of 1); each loss is the
                  sample's summed loss over the batch's label-token count (num_items_in_batch, as
                  the HF Trainer does under gradient accumulation), so the losses add up to the mean
  hf_padded       transformers, one right-padded batch with attention_mask, labels -100 on padding

transformers has no packed varlen path on the CPU with sdpa, so both ways a user would run it are
measured and the faster one is the baseline of every ratio. All three compute the same loss; the
benchmark stops if they differ by more than rtol 1e-4. mm_token_type_ids is passed, so transformers
computes the M-RoPE positions itself.

Peak memory: every (provider, size) runs in a fresh subprocess that loads the same weights file and
builds the same inputs from the seed. After model + inputs are built and every weight has been read
once (safetensors maps weights lazily; otherwise the first step's page-in of the weights would count
as step memory, for every provider alike) and torch._dynamo is imported (a first custom-op call
imports it otherwise: ~140 MiB of modules), the kernel's RSS high-water
mark is reset (`echo 5 > /proc/self/clear_refs`) and the current RSS is the baseline; the peak is
VmHWM after two steps, minus the baseline (ru_maxrss growth where clear_refs is unavailable: it
cannot be reset, so a peak below the one of model construction is hidden; the record says which).
The tensor-level peak (live tensor bytes above the step's start, from the allocation events of
torch.profiler(profile_memory=True); parameters and optimizer state that existed before the step
are not counted) is reported alongside.

examples:
  PYTHONPATH=python:. python bench/models/bench_qwen2_5_vl_step.py --quick      # tiny model, ~30 s
  PYTHONPATH=python:. python bench/models/bench_qwen2_5_vl_step.py              # tiny + 100m
  PYTHONPATH=python:. python bench/models/bench_qwen2_5_vl_step.py --sizes 100m --profile
then: python bench/report.py RESULTS.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):
    # Run as a script: import `bench` from the repository root, and fall back to an unbuilt source
    # tree's `mmfuse` (as bench/run_all.py does).
    _root = Path(__file__).resolve().parents[2]
    sys.path[0] = str(_root)
    try:
        import mmfuse  # noqa: F401
    except ImportError:
        sys.path.insert(1, str(_root / "python"))

import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.models import step_tables  # noqa: E402
from bench.models.peak_memory import PeakRss, live_tensor_peak, page_in  # noqa: E402
from bench.models.step_tables import (FWD_BWD, HF_PADDED, HF_PER_SAMPLE, MMFUSE, MMFUSE_RECOMPUTE,  # noqa: E402
                                      MODES, SCHEMA, WITH_ADAMW)
from mmfuse.models.common.recompute import RecomputeConfig  # noqa: E402
from mmfuse.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig  # noqa: E402
from mmfuse.models.qwen2_5_vl.model import shift_labels  # noqa: E402
from mmfuse.train.metrics import step_flops  # noqa: E402

PROVIDERS = (MMFUSE, MMFUSE_RECOMPUTE, HF_PER_SAMPLE, HF_PADDED)
LOSS_RTOL = 1e-4
IGNORE = -100


# ---- inputs ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """One training sample: text, one image, text."""
    text_before: int               # text tokens before <|vision_start|>
    image_hw: tuple[int, int]      # image height, width in pixels (multiples of patch x merge = 28)
    text_after: int                # text tokens after <|vision_end|>


# Two samples of different lengths, one 224x224 image each (grid (1, 16, 16): 256 patches, 64 LLM
# tokens + 2 markers).
LAYOUTS = {
    "tiny": (Sample(40, (224, 224), 38), Sample(30, (224, 224), 16)),       # 144 + 112 = 256 tokens
    "100m": (Sample(200, (224, 224), 310), Sample(150, (224, 224), 232)),   # 576 + 448 = 1024 tokens
}
# --quick: 112x112 images (grid (1, 8, 8): 16 LLM tokens), 64 + 48 = 112 tokens.
QUICK_LAYOUT = (Sample(20, (112, 112), 26), Sample(14, (112, 112), 16))


@dataclass
class Batch:
    """The same samples in the three forms the providers take."""
    packed: dict                   # mmfuse: input_ids [T], cu_seqlens [B + 1], pixel_values, image_grid_thw
    labels: torch.Tensor           # [T], image pad tokens ignored
    per_sample: list[dict]         # transformers, one batch of 1 per sample (labels included)
    padded: dict                   # transformers, right-padded [B, S_max] with attention_mask
    num_label_tokens: int          # label tokens after the shift within each sample
    shapes: dict                   # what the report states about the inputs


def build_batch(cfg: Qwen2_5_VLConfig, layout: tuple[Sample, ...], seed: int) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    v = cfg.vision
    unit = v.patch_size * v.spatial_merge_size
    ids, labels, grids, pixels = [], [], [], []
    for s in layout:
        h, w = s.image_hw
        if h % unit or w % unit:
            raise ValueError(f"image {h}x{w}: height and width must be multiples of {unit}")
        grid = (1, h // v.patch_size, w // v.patch_size)
        n_pad = grid[1] * grid[2] // v.spatial_merge_size ** 2
        # Text tokens stay below the special tokens at the end of the small vocabularies.
        text = [torch.randint(0, cfg.vision_start_token_id - 2, (n,), generator=gen) for n in (s.text_before,
                                                                                             s.text_after)]
        span = torch.tensor([cfg.vision_start_token_id] + [cfg.image_token_id] * n_pad + [cfg.vision_end_token_id])
        x = torch.cat([text[0], span, text[1]])
        y = x.clone()
        y[x == cfg.image_token_id] = IGNORE
        ids.append(x)
        labels.append(y)
        grids.append(grid)
        pixels.append(torch.randn(grid[0] * grid[1] * grid[2], v.patch_dim, generator=gen))

    lens = [len(x) for x in ids]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    packed_ids, packed_labels = torch.cat(ids), torch.cat(labels)
    packed = dict(input_ids=packed_ids, cu_seqlens=cu, pixel_values=torch.cat(pixels),
                  image_grid_thw=torch.tensor(grids))
    n_label = int((shift_labels(packed_labels, cu, IGNORE) != IGNORE).sum())

    def types(x):  # transformers' mm_token_type_ids: 0 text, 1 image pad, 2 video pad
        return (x == cfg.image_token_id).to(torch.int32)

    per_sample = [dict(input_ids=x[None], mm_token_type_ids=types(x)[None], labels=y[None], pixel_values=p,
                       image_grid_thw=torch.tensor([g])) for x, y, p, g in zip(ids, labels, pixels, grids)]
    s_max, b = max(lens), len(lens)
    pad_ids = torch.full((b, s_max), cfg.bos_token_id)   # <|endoftext|>, Qwen's pad token
    pad_labels = torch.full((b, s_max), IGNORE)
    mask = torch.zeros(b, s_max, dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids, labels)):
        pad_ids[i, :len(x)], pad_labels[i, :len(x)], mask[i, :len(x)] = x, y, 1
    padded = dict(input_ids=pad_ids, attention_mask=mask, mm_token_type_ids=types(pad_ids) * mask.to(torch.int32),
                  labels=pad_labels, pixel_values=torch.cat(pixels), image_grid_thw=torch.tensor(grids))
    shapes = {"samples": len(lens), "sample_tokens": lens, "tokens": sum(lens), "label_tokens": n_label,
              "images": [f"{h}x{w}" for h, w in (s.image_hw for s in layout)], "image_grid_thw": grids,
              "pixel_values": list(packed["pixel_values"].shape), "padded_batch": [b, s_max],
              "padding_fraction": 1 - sum(lens) / (b * s_max)}
    return Batch(packed, packed_labels, per_sample, padded, n_label, shapes)


# ---- models and steps --------------------------------------------------------------------------

def hf_config(cfg: Qwen2_5_VLConfig):
    import transformers

    hf_cfg = transformers.Qwen2_5_VLConfig.from_dict(cfg.to_hf_dict())
    for c in (hf_cfg, hf_cfg.text_config, hf_cfg.vision_config):
        c._attn_implementation = "sdpa"
    return hf_cfg


def write_weights(cfg: Qwen2_5_VLConfig, seed: int, out_dir: Path) -> None:
    """transformers' own initialisation of the model, saved where every provider loads it from."""
    import transformers

    torch.manual_seed(seed)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(hf_config(cfg))
    hf.save_pretrained(out_dir)


def load_model(provider: str, weights_dir: Path) -> torch.nn.Module:
    if provider in (MMFUSE, MMFUSE_RECOMPUTE):
        model = Qwen2_5_VL.from_pretrained(weights_dir)
        if provider == MMFUSE_RECOMPUTE:
            full = RecomputeConfig("full", "uniform", 1)
            model.set_recompute(vision=full, text=full)
    else:
        import transformers

        model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
            weights_dir, attn_implementation="sdpa", dtype=torch.float32)
    return model.train()


def loss_and_backward(provider: str, model, batch: Batch, backward: bool = True) -> torch.Tensor:
    """The batch's mean loss (detached), after its backward when asked."""
    if provider in (MMFUSE, MMFUSE_RECOMPUTE):
        losses = [model(**batch.packed, labels=batch.labels).loss]
    elif provider == HF_PER_SAMPLE:
        losses = []
        for kw in batch.per_sample:   # one graph alive at a time, as gradient accumulation runs it
            loss = model(**kw, use_cache=False, num_items_in_batch=batch.num_label_tokens).loss
            if backward:
                loss.backward()
            losses.append(loss.detach())
        return sum(losses)
    else:
        losses = [model(**batch.padded, use_cache=False, num_items_in_batch=batch.num_label_tokens).loss]
    if backward:
        losses[0].backward()
    return losses[0].detach()


def step_fn(provider: str, model, batch: Batch, optimizer: torch.optim.Optimizer | None) -> Callable:
    if optimizer is None:
        return lambda: loss_and_backward(provider, model, batch)

    def step():
        loss = loss_and_backward(provider, model, batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def make_optimizer(model) -> torch.optim.Optimizer:
    # What mmfuse.train builds on the CPU (fused AdamW); the same settings for every provider.
    return torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)


def clear_grads(model) -> None:
    for p in model.parameters():
        p.grad = None


def check_losses(losses: dict[str, float]) -> None:
    ref = losses[MMFUSE]
    bad = {p: v for p, v in losses.items() if abs(v - ref) > LOSS_RTOL * abs(ref)}
    if bad:
        raise SystemExit(f"losses differ by more than rtol {LOSS_RTOL}: mmfuse {ref!r}, others {bad}; "
                         "the providers would not be doing the same work")


# ---- timing ------------------------------------------------------------------------------------

def time_interleaved(runs: dict[str, Callable], resets: dict[str, Callable], warmup: int, reps: int,
                     max_time_s: float | None, min_reps: int = 3) -> dict[str, dict]:
    """p50/p20/p80/min ms per provider, reps taken round-robin (one of each in turn), so a change
    in the machine's load during the run hits every provider alike. `resets[p]()` runs before each
    call, untimed. A provider leaves the rotation after max_time_s of timed calls and min_reps."""
    for _ in range(warmup):
        for name, fn in runs.items():
            resets[name]()
            del_out = fn()
            del del_out
    times: dict[str, list[float]] = {name: [] for name in runs}
    active = list(runs)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(max(reps, 1)):
            for name in list(active):
                resets[name]()
                t0 = time.perf_counter()
                out = runs[name]()
                t1 = time.perf_counter()
                del out
                times[name].append((t1 - t0) * 1e3)
                if max_time_s is not None and sum(times[name]) >= max_time_s * 1e3 and \
                        len(times[name]) >= min_reps:
                    active.remove(name)
            if not active:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    for name in runs:
        resets[name]()
    result = {}
    for name, ts in times.items():
        s = sorted(ts)
        result[name] = {"p50_ms": common.quantile(s, 0.5), "p20_ms": common.quantile(s, 0.2),
                        "p80_ms": common.quantile(s, 0.8), "min_ms": s[0], "reps": len(s)}
    return result


# ---- where the time goes -------------------------------------------------------------------------

# The matrix products both providers run alike; what is left of a step besides them is what fusing can save.
GEMM_OPS = frozenset({"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"})


def profile_step(provider: str, model, batch: Batch, top: int = 15) -> dict:
    """torch.profiler over one fwd+bwd step: the ops with the most self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    loss_and_backward(provider, model, batch)   # warm, outside the profile
    clear_grads(model)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        loss_and_backward(provider, model, batch)
        wall_ms = (time.perf_counter() - t0) * 1e3
    clear_grads(model)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    total_self_ms = sum(e.self_cpu_time_total for e in events) / 1e3
    rows = [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
             "total_ms": e.cpu_time_total / 1e3, "self_pct": 100 * e.self_cpu_time_total / 1e3 / total_self_ms}
            for e in events[:top]]
    gemm_ms = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS) / 1e3
    return {"wall_ms": wall_ms, "self_ms_total": total_self_ms, "gemm_self_ms": gemm_ms,
            "gemm_fraction": gemm_ms / total_self_ms, "top": rows}


# ---- peak memory (run in a subprocess per provider and size) -----------------------------------

def measure_memory(provider: str, size: str, weights_dir: Path, seed: int, quick: bool, steps: int = 2) -> dict:
    """Peak memory of `steps` fwd+bwd steps, then of `steps` fwd+bwd+AdamW steps, in this process;
    meant to run in a fresh process per provider and size (see the module docstring)."""
    cfg = Qwen2_5_VLConfig.preset(size)
    model = load_model(provider, weights_dir)
    batch = build_batch(cfg, QUICK_LAYOUT if quick else LAYOUTS[size], seed)
    page_in(model)
    # Module imports are not step memory. A process's first call of a torch.library custom op imports
    # torch._dynamo (torch wraps custom-op kernels in torch._disable_dynamo): about 140 MiB of modules, once
    # per process. transformers imports it when it loads a model and mmfuse's from_pretrained does not, so
    # without this mmfuse's first step carried it (tiny: 162 instead of 20 MiB).
    import torch._dynamo  # noqa: F401
    gc.collect()
    rss = PeakRss()
    built_maxrss = PeakRss.maxrss()
    baseline = rss.current()
    out = {"provider": provider, "size": size, "baseline_rss_bytes": baseline}

    rss.reset()
    loss = None
    for _ in range(steps):
        clear_grads(model)
        got = float(loss_and_backward(provider, model, batch))
        loss = got if loss is None else loss
    out["loss"] = loss
    out[f"peak_rss_growth_{FWD_BWD}"] = rss.peak() - baseline
    clear_grads(model)

    optimizer = make_optimizer(model)
    step = step_fn(provider, model, batch, optimizer)
    rss.reset()
    for _ in range(steps):
        step()
    out[f"peak_rss_growth_{WITH_ADAMW}"] = rss.peak() - baseline
    out["rss_method"] = rss.method
    # Without a reset, a step peak below the construction peak does not show: say so.
    out["rss_masked_by_construction"] = (not rss.resettable) and rss.peak() <= built_maxrss
    out["adamw_state_bytes"] = sum(p.numel() * p.element_size() * 2 for p in model.parameters())

    clear_grads(model)
    out[f"live_tensor_peak_{FWD_BWD}"] = live_tensor_peak(lambda: loss_and_backward(provider, model, batch))
    clear_grads(model)
    out[f"live_tensor_peak_{WITH_ADAMW}"] = live_tensor_peak(step)
    return out


def memory_in_subprocess(provider: str, size: str, weights_dir: Path, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    argv = [sys.executable, str(Path(__file__).resolve()), "--child-memory", provider, "--sizes", size,
            "--weights", str(weights_dir), "--seed", str(args.seed), "--child-out", str(out)]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    if args.quick:
        argv.append("--quick")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"provider": provider, "size": size, "error": " | ".join(tail)}
        return common.read_json(out)
    finally:
        out.unlink(missing_ok=True)


# ---- one size ------------------------------------------------------------------------------------

def param_counts(model: Qwen2_5_VL) -> dict:
    named = dict(model.named_parameters())
    total = sum(p.numel() for p in named.values())
    vision = sum(p.numel() for n, p in named.items() if n.startswith("visual."))
    embed = model.model.embed_tokens.weight.numel()
    return {"total": total, "vision": vision, "text_embedding": embed, "text_layers": total - vision - embed,
            "lm_head_tied": model.lm_head is None}


def bench_size(size: str, args, tmp: Path, say: Callable[[str], None]) -> dict:
    cfg = Qwen2_5_VLConfig.preset(size)
    weights = tmp / size
    write_weights(cfg, args.seed, weights)
    batch = build_batch(cfg, QUICK_LAYOUT if args.quick else LAYOUTS[size], args.seed)
    models = {p: load_model(p, weights) for p in PROVIDERS}
    with torch.no_grad():
        losses = {p: float(loss_and_backward(p, m, batch, backward=False)) for p, m in models.items()}
    check_losses(losses)
    flops = step_flops(models[MMFUSE], [batch.packed])
    tokens = batch.shapes["tokens"]
    say(f"{size}: {param_counts(models[MMFUSE])['total'] / 1e6:.1f}M params, {tokens} tokens "
        f"{batch.shapes['sample_tokens']}, loss {losses[MMFUSE]:.6f} (all providers within rtol {LOSS_RTOL}), "
        f"{flops / 1e9:.1f} GFLOP per step")

    records = []
    resets = {p: (lambda m=m: clear_grads(m)) for p, m in models.items()}
    for mode in MODES:
        runs = {p: step_fn(p, m, batch, make_optimizer(m) if mode == WITH_ADAMW else None)
                for p, m in models.items()}
        t0 = time.perf_counter()
        timed = time_interleaved(runs, resets, args.warmup, args.reps, args.max_time)
        for p, t in timed.items():
            records.append({"size": size, "mode": mode, "provider": p, **t, "tokens": tokens,
                            "tokens_per_s": tokens / (t["p50_ms"] * 1e-3),
                            "gflops": flops / (t["p50_ms"] * 1e-3) / 1e9})
        say(f"{size} {mode}: " + ", ".join(f"{p} {t['p50_ms']:.1f} ms" for p, t in timed.items())
            + f" ({time.perf_counter() - t0:.0f} s)")

    result = {"config": {"text": vars(cfg.text), "vision": vars(cfg.vision)},
              "params": param_counts(models[MMFUSE]), "inputs": batch.shapes, "flops_per_step": flops,
              "losses": losses, "records": records}
    if args.profile:
        result["profile"] = {}
        for p in (MMFUSE, MMFUSE_RECOMPUTE, step_tables.baseline_of(records, FWD_BWD)):
            result["profile"][p] = profile_step(p, models[p], batch)
            say(f"{size}: profiled {p}")
    del models
    gc.collect()

    if args.memory:
        result["memory"] = []
        for p in PROVIDERS:
            m = memory_in_subprocess(p, size, weights, args)
            result["memory"].append(m)
            if "error" in m:
                say(f"{size} memory {p}: error: {m['error']}")
                continue
            if abs(m["loss"] - losses[MMFUSE]) > LOSS_RTOL * abs(losses[MMFUSE]):
                raise SystemExit(f"{size} memory run of {p}: loss {m['loss']} differs from {losses[MMFUSE]}")
            say(f"{size} memory {p}: peak RSS growth fwd+bwd {m[f'peak_rss_growth_{FWD_BWD}'] / 2**20:.0f} MiB, "
                f"+adamw {m[f'peak_rss_growth_{WITH_ADAMW}'] / 2**20:.0f} MiB ({m['rss_method']})")
    return result


# ---- command line --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/models/bench_qwen2_5_vl_step.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None, help="comma list of presets (default: tiny,100m; --quick: tiny)")
    p.add_argument("--quick", action="store_true",
                   help="112-token batches with 112x112 images, few reps: checks the benchmark end to end; "
                        "timings are not meaningful")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch.set_num_threads (default: torch's current setting, {torch.get_num_threads()})")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per provider (default: 2, quick 1)")
    p.add_argument("--reps", type=int, default=None, help="timed steps per provider (default: 10, quick 3)")
    p.add_argument("--max-time", type=float, default=None, metavar="S",
                   help="stop timing a provider after S seconds once 3 reps are done (default: 60, quick 5)")
    p.add_argument("--seed", type=int, default=0, help="weights and inputs seed (default: 0)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory subprocesses")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler over one fwd+bwd step of mmfuse and of the HF baseline: top ops")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default: bench/results/qwen2_5_vl-step-<date>-<commit>[-quick].json)")
    p.add_argument("--child-memory", choices=PROVIDERS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--weights", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def settle(args) -> None:
    q = args.quick
    args.sizes = [s.strip() for s in (args.sizes or ("tiny" if q else "tiny,100m")).split(",") if s.strip()]
    unknown = [s for s in args.sizes if s not in LAYOUTS]
    if unknown:
        raise SystemExit(f"--sizes: unknown {unknown}; choose from {sorted(LAYOUTS)}")
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 2)
    args.reps = args.reps if args.reps is not None else (3 if q else 10)
    args.max_time = args.max_time if args.max_time is not None else (5.0 if q else 60.0)


def default_out(quick: bool) -> Path:
    commit, _ = common.git_commit()
    date = time.strftime("%Y-%m-%d", time.gmtime())
    name = f"qwen2_5_vl-step-{date}-{commit or 'nogit'}{'-quick' if quick else ''}.json"
    return common.REPO_ROOT / "bench" / "results" / name


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settle(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()   # config-conversion notices, not results
    if args.child_memory:
        common.write_json(args.child_out, measure_memory(args.child_memory, args.sizes[0], args.weights,
                                                         args.seed, args.quick))
        return 0

    from bench.run_all import command_line

    env = common.environment()
    env["transformers"] = transformers.__version__
    print(f"# {env['cpu_model']} | {env['usable_cpus']} cpus, {env['threads']} threads | torch {env['torch']} | "
          f"transformers {env['transformers']} | mmfuse {env['mmfuse']} ({env['mmfuse_active_isa'] or 'no C++ core'})"
          f" | commit {env['git_commit']}{'+dirty' if env['git_dirty'] else ''} | load {env['load_average']}",
          flush=True)
    t_start = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    env["sgemm_n"] = 512 if args.quick else 2048
    env["sgemm_gflops"] = common.sgemm_gflops(env["sgemm_n"])
    common.copy_bandwidth_gbps(64 * 2**20)   # context for the memory-bound ops, as the op benchmarks record
    env["copy_gbps"] = common.copy_bandwidth_measurements()
    say(f"fp32 GEMM {env['sgemm_gflops']:.0f} GFLOP/s, copy {env['copy_gbps']['67108864']:.1f} GB/s")
    sizes = {}
    with tempfile.TemporaryDirectory(prefix="mmfuse-step-") as tmp:
        for size in args.sizes:
            sizes[size] = bench_size(size, args, Path(tmp), say)
    env["wall_s"] = round(time.perf_counter() - t_start, 1)
    payload = {"schema": SCHEMA, "command": command_line(), "created_utc": common.utc_now(),
               "settings": {"sizes": args.sizes, "quick": args.quick, "warmup": args.warmup, "reps": args.reps,
                            "max_time_s": args.max_time, "seed": args.seed, "memory": args.memory,
                            "loss_rtol": LOSS_RTOL},
               "environments": [env], "sizes": sizes}
    payload["summary"] = step_tables.summarise(payload)
    payload["targets"] = step_tables.targets(payload)
    path = common.write_json(args.out or default_out(args.quick), payload)
    print()
    print(step_tables.format_text(payload))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
