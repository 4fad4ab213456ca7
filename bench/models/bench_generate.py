"""Greedy generation with Qwen2.5-VL on the CPU: mmfuse's `generate` (packed prefill, key/value cache,
fused ops) against transformers' `generate(do_sample=False)` (sdpa attention, its dynamic cache), on the
same weights and the same prompts: one image and text each, as in bench_qwen2_5_vl_step's samples.
With --batch B, B prompts are generated together: mmfuse packs them into one stream (no padding),
transformers gets them left-padded with an attention mask.

mmfuse must produce the tokens transformers produces for each prompt alone (the benchmark stops
otherwise); whether transformers' padded batch does too is recorded. Each provider is timed generating
1 token (prefill: the vision tower and the prompt through the decoder, time to first token) and
NEW tokens per prompt; decode time per step (one token for each prompt) = (t_NEW - t_1) / (NEW - 1).
Neither stops early: no end token.

What to expect, written before measuring. A decode step of one sequence reads every text weight
once (layers + the tied LM head: 40.5M parameters at 100m, 162 MB fp32) and does 2 FLOPs per weight
(81 MFLOP): memory-bound, about 10-16 ms per token at this VM's 10-15 GB/s, plus per-op overhead
(~10 ops per layer). At the tiny size the weights are 0.4 MB, so a step is all overhead: Python,
dispatch, cache bookkeeping. transformers' generate adds logits processors, stopping criteria and
cache objects per step, and its M-RoPE path per step. A batch of B reads the weights once per step
for all B tokens, so a step should cost little more than one sequence's while the weights dominate;
transformers' padded batch also attends over the padding.

examples:
  PYTHONPATH=python:. python bench/models/bench_generate.py --quick
  PYTHONPATH=python:. python bench/models/bench_generate.py            # tiny and 100m
  PYTHONPATH=python:. python bench/models/bench_generate.py --batch 4  # 4 prompts at once
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    _root = Path(__file__).resolve().parents[2]
    sys.path[0] = str(_root)
    try:
        import mmfuse  # noqa: F401
    except ImportError:
        sys.path.insert(1, str(_root / "python"))

import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.models.bench_qwen2_5_vl_step import LAYOUTS, QUICK_LAYOUT, build_batch, load_model, write_weights  # noqa: E402
from mmfuse.data.packing import ProcessedSample  # noqa: E402
from mmfuse.infer import GenerationConfig, generate  # noqa: E402
from mmfuse.models.qwen2_5_vl import Qwen2_5_VLConfig  # noqa: E402

MMFUSE, HF = "mmfuse", "transformers"


def providers(cfg: Qwen2_5_VLConfig, weights: Path, layout, seed: int, batch: int):
    """{provider: fn(n_new) -> new token ids per prompt} for `batch` prompts (the layout's samples in turn,
    each with its own random text): mmfuse packs them into one stream; transformers takes them left-padded
    with an attention mask (its batched generate), or alone for a batch of 1. Also the prompts' lengths and
    transformers' tokens per prompt alone (the reference of the correctness check)."""
    samples = build_batch(cfg, tuple(layout[i % len(layout)] for i in range(batch)), seed).per_sample
    ours, hf = load_model(MMFUSE, weights).eval(), load_model("hf_per_sample", weights).eval()
    prompts = [ProcessedSample(input_ids=p["input_ids"][0], labels=torch.full_like(p["input_ids"][0], -100),
                               pixel_values=p["pixel_values"], image_grid_thw=p["image_grid_thw"]) for p in samples]
    lengths = [int(p["input_ids"].shape[1]) for p in samples]
    pad = cfg.bos_token_id   # <|endoftext|>, Qwen's pad token
    s_max = max(lengths)
    padded = {
        "input_ids": torch.stack([torch.cat([torch.full((s_max - n,), pad), p["input_ids"][0]])
                                  for p, n in zip(samples, lengths)]),
        "attention_mask": torch.stack([torch.cat([torch.zeros(s_max - n, dtype=torch.long),
                                                  torch.ones(n, dtype=torch.long)]) for n in lengths]),
        "mm_token_type_ids": torch.stack([torch.cat([torch.zeros(s_max - n, dtype=torch.int32),
                                                     p["mm_token_type_ids"][0]]) for p, n in zip(samples, lengths)]),
        "pixel_values": torch.cat([p["pixel_values"] for p in samples]),
        "image_grid_thw": torch.cat([p["image_grid_thw"] for p in samples]),
    }

    def run_ours(n: int) -> list[list[int]]:
        return [g.tokens for g in generate(ours, prompts, GenerationConfig(max_new_tokens=n))]

    @torch.no_grad()
    def hf_generate(inputs: dict, n: int) -> torch.Tensor:
        return hf.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                           pad_token_id=pad)

    def run_hf(n: int) -> list[list[int]]:
        if batch == 1:
            p = samples[0]
            inputs = {k: p[k] for k in ("input_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw")}
            return [hf_generate(inputs, n)[0, lengths[0]:].tolist()]
        return [row[s_max:].tolist() for row in hf_generate(padded, n)]

    def hf_alone(n: int) -> list[list[int]]:
        out = []
        for p, length in zip(samples, lengths):
            inputs = {k: p[k] for k in ("input_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw")}
            out.append(hf_generate(inputs, n)[0, length:].tolist())
        return out

    return {MMFUSE: run_ours, HF: run_hf}, lengths, hf_alone


def interleaved(runs: dict, new_tokens: int, reps: int, max_time_s: float) -> dict[str, tuple[float, float]]:
    """{provider: (p50 ms for 1 token, p50 ms for new_tokens)}, the calls taken round-robin (1 token, then
    new_tokens, for each provider in turn), so a change in the machine's load hits every provider alike."""
    for fn in runs.values():     # warm-up
        fn(1)
        fn(new_tokens)
    samples = {name: ([], []) for name in runs}
    began = time.perf_counter()
    for rep in range(reps):
        for name, fn in runs.items():
            for n, store in zip((1, new_tokens), samples[name]):
                t0 = time.perf_counter()
                fn(n)
                store.append((time.perf_counter() - t0) * 1e3)
        if rep >= 2 and time.perf_counter() - began > max_time_s:
            break
    return {name: tuple(common.quantile(sorted(s), 0.5) for s in pair) for name, pair in samples.items()}


def bench_size(size: str, args, tmp: Path, say) -> dict:
    cfg = Qwen2_5_VLConfig.preset(size)
    weights = tmp / size
    write_weights(cfg, args.seed, weights)
    layout = QUICK_LAYOUT if args.quick else LAYOUTS[size]
    runs, lengths, hf_alone = providers(cfg, weights, layout, args.seed, args.batch)
    prompt_tokens = sum(lengths)
    tokens = {name: fn(args.new_tokens) for name, fn in runs.items()}
    reference = hf_alone(args.new_tokens)
    if tokens[MMFUSE] != reference:
        raise SystemExit(f"{size}: mmfuse generates {tokens[MMFUSE]}, transformers (each prompt alone) {reference}")
    hf_batched_equal = tokens[HF] == reference
    if not hf_batched_equal:   # padding changes transformers' rounding; reported, not fatal
        say(f"{size}: transformers' padded batch generates other tokens than its prompts alone")
    out = {"batch": args.batch, "prompt_lengths": lengths, "prompt_tokens": prompt_tokens,
           "new_tokens": args.new_tokens, "tokens": tokens[MMFUSE], "transformers_batched_equals_alone": hf_batched_equal,
           "records": []}
    times = interleaved(runs, args.new_tokens, args.reps, args.max_time)
    for name, (first, full) in times.items():
        per_token = (full - first) / (args.new_tokens - 1)
        out["records"].append({"provider": name, "prefill_p50_ms": first, "total_p50_ms": full,
                               "decode_ms_per_step": per_token,
                               "decode_tokens_per_s": args.batch * 1e3 / per_token if per_token > 0 else None})
        say(f"{size} x{args.batch} {name}: prefill {first:.1f} ms ({prompt_tokens} tokens), decode step "
            f"{per_token:.2f} ms ({args.batch} tokens), {args.new_tokens} tokens each in {full:.0f} ms")
    by = {r["provider"]: r for r in out["records"]}
    out["speedup"] = {"prefill": by[HF]["prefill_p50_ms"] / by[MMFUSE]["prefill_p50_ms"],
                      "decode_step": by[HF]["decode_ms_per_step"] / by[MMFUSE]["decode_ms_per_step"],
                      "total": by[HF]["total_p50_ms"] / by[MMFUSE]["total_p50_ms"]}
    say(f"{size} x{args.batch}: mmfuse / transformers speed-up: prefill {out['speedup']['prefill']:.2f}x, decode "
        f"step {out['speedup']['decode_step']:.2f}x, all {args.new_tokens} tokens {out['speedup']['total']:.2f}x")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/models/bench_generate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None, help="comma list of presets (default: tiny,100m; --quick: tiny)")
    p.add_argument("--quick", action="store_true", help="small prompt, few reps: checks the benchmark end to end")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per call (default 32; quick 8)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per measurement (default 7; quick 2)")
    p.add_argument("--max-time", type=float, default=60.0, metavar="S",
                   help="stop taking reps after S seconds once 3 are done (default 60)")
    p.add_argument("--batch", type=int, default=1,
                   help="prompts generated together (default 1; transformers gets them left-padded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default: bench/results/qwen2_5_vl-generate-<date>-<commit>.json)")
    args = p.parse_args(argv)
    args.sizes = [s for s in (args.sizes or ("tiny" if args.quick else "tiny,100m")).split(",") if s]
    args.new_tokens = args.new_tokens or (8 if args.quick else 32)
    args.reps = args.reps or (2 if args.quick else 7)
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be at least 2 (decode time is the difference to 1 token)")
    import transformers

    transformers.logging.set_verbosity_error()
    env = common.environment()
    env["transformers"] = transformers.__version__
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    say(f"{env['cpu_model']} | {env['threads']} threads | torch {env['torch']} | transformers {env['transformers']}"
        f" | load {env['load_average']}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            results[size] = bench_size(size, args, Path(tmp), say)
    commit, _ = common.git_commit()
    out = args.out or (common.REPO_ROOT / "bench" / "results" /
                       f"qwen2_5_vl-generate-{time.strftime('%Y-%m-%d', time.gmtime())}-{commit or 'nogit'}"
                       f"{f'-b{args.batch}' if args.batch > 1 else ''}{'-quick' if args.quick else ''}.json")
    common.write_json(out, {"benchmark": "qwen2_5_vl_generate", "environment": env,
                            "settings": {"new_tokens": args.new_tokens, "reps": args.reps, "quick": args.quick,
                                         "batch": args.batch},
                            "sizes": results})
    say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
