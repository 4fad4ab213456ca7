"""`mmfuse plan`: memory per device, pipeline bubble, communication and an estimated step time of
Qwen2.5-VL training under a parallel layout, before anything is launched (mmfuse.parallel.planner).

  mmfuse plan --preset 7b --world 8 --tp 2 --pp 2
  mmfuse plan --preset 72b --world 32 --tp 4 --pp 8 --zero1 --recompute full --device-gib 141
  mmfuse plan --config Qwen2.5-VL-7B-Instruct/config.json --world 16 --search 5"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

PRESETS = ("tiny", "100m", "3b", "7b", "32b", "72b")


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace("[", "").replace("]", "").split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 12,16; got {text!r}") from None


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="memory, bubble, communication and step time of a parallel layout",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--preset", choices=PRESETS, default="7b", help="Qwen2.5-VL shape (default 7b)")
    m.add_argument("--config", metavar="PATH", help="a Hugging Face config.json, or the folder holding it "
                                                    "(instead of --preset)")
    lay = p.add_argument_group("layout (the run config's parallel: section)")
    lay.add_argument("--world", type=int, required=True, help="number of devices (torchrun's world size)")
    lay.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    lay.add_argument("--pp", type=int, default=1, help="pipeline stages")
    lay.add_argument("--vpp", type=int, default=1, help="model chunks per pipeline rank (interleaved 1F1B)")
    lay.add_argument("--cp", type=int, default=1, help="context parallel size")
    lay.add_argument("--cp-kind", choices=("ring", "ulysses"), default="ring", help="context parallel algorithm")
    lay.add_argument("--no-sequence-parallel", action="store_true", help="TP without sequence parallelism")
    lay.add_argument("--zero1", action="store_true", help="shard optimizer state over data-parallel ranks")
    lay.add_argument("--no-overlap-grad-reduce", action="store_true",
                     help="reduce gradients after backward instead of during it")
    lay.add_argument("--vit-pp-layers", type=_ints, metavar="N,N,..", help="ViT blocks per virtual stage")
    lay.add_argument("--llm-pp-layers", type=_ints, metavar="N,N,..", help="decoder layers per virtual stage")
    lay.add_argument("--balance", action="store_true",
                     help="choose --llm-pp-layers to even out stage compute (ViT on the first stage, LM head "
                          "on the last)")
    w = p.add_argument_group("workload")
    w.add_argument("--seq-length", type=int, default=4096, help="tokens per packed micro-batch (default 4096)")
    w.add_argument("--image-tokens", type=int, help="image tokens among them (default a quarter)")
    w.add_argument("--micro-batches", type=int, default=8, help="micro-batches per step per data-parallel rank")
    w.add_argument("--recompute", choices=("none", "selective", "full"), default="none",
                   help="decoder activation recompute (full: uniform, one layer per chunk)")
    w.add_argument("--recompute-vit", choices=("none", "selective", "full"), default="none",
                   help="ViT activation recompute")
    w.add_argument("--freeze", nargs="*", default=[], metavar="GROUP",
                   help="frozen groups: vision_encoder, projector, text_decoder")
    h = p.add_argument_group("hardware (assumptions of the estimate)")
    h.add_argument("--device-gib", type=float, default=80.0, help="memory per device in GiB (default 80)")
    h.add_argument("--reserve-gib", type=float, default=4.0, help="kept back for context, buffers, fragmentation")
    h.add_argument("--devices-per-node", type=int, default=8)
    h.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per device (default H100)")
    h.add_argument("--efficiency", type=float, default=0.5, help="fraction of peak the kernels reach")
    h.add_argument("--intra-node-gbs", type=float, default=300.0, help="GB/s a rank sends within a node")
    h.add_argument("--inter-node-gbs", type=float, default=40.0, help="GB/s a rank sends across nodes")
    p.add_argument("--search", type=int, metavar="N",
                   help="instead of one layout, list the N fastest layouts that fit on --world devices")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def _model(args):
    from mmfuse.models.qwen2_5_vl.config import Qwen2_5_VLConfig

    if not args.config:
        return Qwen2_5_VLConfig.preset(args.preset), f"Qwen2.5-VL {args.preset}"
    path = Path(args.config)
    path = path / "config.json" if path.is_dir() else path
    cfg = Qwen2_5_VLConfig.from_hf_dict(json.loads(path.read_text()))
    cfg.validate()
    return cfg, str(path.parent.name or path)


def run(args: argparse.Namespace) -> int:
    from mmfuse.parallel.layout import ParallelLayout
    from mmfuse.parallel.planner import Hardware, balanced_llm_layers, describe_layout, format_plan, plan, search

    try:
        cfg, name = _model(args)
        hw = Hardware(devices_per_node=args.devices_per_node, peak_tflops=args.peak_tflops,
                      compute_efficiency=args.efficiency, intra_node_gbs=args.intra_node_gbs,
                      inter_node_gbs=args.inter_node_gbs, reserve_gib=args.reserve_gib)
        work = dict(image_tokens=args.image_tokens, recompute_text=args.recompute, recompute_vision=args.recompute_vit,
                    frozen=tuple(args.freeze), hardware=hw, model=name)
        if args.search:
            return _print_search(search(cfg, args.world, args.seq_length, args.micro_batches, args.device_gib,
                                        limit=args.search, **work), args, describe_layout)
        layout = ParallelLayout(tp=args.tp, pp=args.pp, vpp=args.vpp, cp=args.cp, cp_kind=args.cp_kind,
                                sequence_parallel=not args.no_sequence_parallel, zero1=args.zero1,
                                overlap_grad_reduce=not args.no_overlap_grad_reduce,
                                vit_pp_layers=args.vit_pp_layers or [], llm_pp_layers=args.llm_pp_layers or [])
        if args.balance and not args.llm_pp_layers and layout.pp > 1:
            layout.validate(args.world, None)
            layout.llm_pp_layers = balanced_llm_layers(cfg, layout, args.seq_length, args.image_tokens)
        report = plan(cfg, layout, args.world, args.seq_length, args.micro_batches, args.device_gib, **work)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        out = dataclasses.asdict(report)
        out.update(fits=report.fits, tokens_per_second_per_device=report.tokens_per_second_per_device,
                   mfu=report.mfu)
        print(json.dumps(out, indent=1))
    else:
        print(format_plan(report))
        if layout.llm_pp_layers and args.balance:
            print(f"(--balance chose llm_pp_layers {layout.llm_pp_layers})")
    return 0 if report.fits else 1


def _print_search(reports, args, describe_layout) -> int:
    if not reports:
        print(f"no layout fits {args.world} devices of {args.device_gib:g} GiB at seq_length {args.seq_length}; "
              f"try --recompute full, --freeze vision_encoder, fewer tokens or more devices")
        return 1
    print(f"{'layout':<48} {'llm_pp_layers':<24} {'peak GiB':>8} {'bubble':>7} {'step s':>7} {'tok/s/dev':>10}")
    for r in reports:
        lay = r.layout
        print(f"{describe_layout(lay, r.world_size):<48} {str(lay.llm_pp_layers or '-'):<24} "
              f"{r.peak_stage.total_bytes / 2 ** 30:>8.1f} {100 * r.bubble:>6.1f}% {r.step_seconds:>7.2f} "
              f"{r.tokens_per_second_per_device:>10,.0f}")
    return 0
