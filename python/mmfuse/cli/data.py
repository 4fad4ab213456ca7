"""`mmfuse data`: prepare and check training data.

  mmfuse data llava2mllm --input llava_instruct_150k.json --image-root COCO/train2017 --output mllm.json
  mmfuse data check data.json
  mmfuse data make-demo DIR"""

from __future__ import annotations

import argparse
import sys


def run_llava2mllm(args: argparse.Namespace) -> int:
    from mmfuse.data.llava import convert_file

    try:
        result = convert_file(args.input, args.image_root, args.output, force=args.force,
                              absolute_paths=args.absolute_paths)
    except (FileExistsError, NotADirectoryError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"converted: {result.converted}")
    print(result.report.format())
    if not result.converted:
        print(f"error: no sample of {args.input} could be converted; {args.output} was not written", file=sys.stderr)
        return 1
    print(f"wrote {result.output}")
    if not args.absolute_paths:
        print(f"image paths are relative to --image-root: set dataset_dir to {args.image_root} in data.json")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from mmfuse.data.check import check_dataset

    return check_dataset(args.config, limit=args.limit, as_json=args.json, cutoff_len=args.cutoff_len)


def run_make_demo(args: argparse.Namespace) -> int:
    from mmfuse.train.demo import make_demo_run

    try:
        run = make_demo_run(args.dir, n_train=args.samples, seed=args.seed, force=args.force)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.samples} training samples under {args.dir}/data, held-out samples under {run.eval_dir}, "
          f"a tokenizer and a random-init tiny Qwen2.5-VL in {run.model_dir}, and the run config {run.train_yaml}\n"
          f"next: mmfuse train {run.train_yaml}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="convert, check and generate training data",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    p.set_defaults(run=lambda args: (p.print_help(), 2)[1])

    c = dsub.add_parser(
        "llava2mllm", help="convert LLaVA-Instruct JSON to the MLLM format",
        description="Convert LLaVA-Instruct records {id, image, conversations: [{from, value}]} to MLLM records "
                    "{images, messages: [{role, content}]} (human -> user, gpt -> assistant, system kept). "
                    "Samples with a missing image, an unknown speaker, a <image> tag count that does not match, "
                    "or turns that do not alternate are skipped and counted per reason. The output is written "
                    "atomically (.json: one list; .jsonl: one sample per line) and never overwrites an existing "
                    "file unless --force.")
    c.add_argument("--input", required=True, help="LLaVA-Instruct .json (a list) or .jsonl file")
    c.add_argument("--image-root", required=True,
                   help="folder holding the images named by each record's 'image' field (e.g. COCO train2017)")
    c.add_argument("--output", required=True, help="MLLM file to write (.json or .jsonl)")
    c.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    c.add_argument("--absolute-paths", action="store_true",
                   help="write absolute image paths instead of paths relative to --image-root")
    c.set_defaults(run=run_llava2mllm)

    k = dsub.add_parser(
        "check", help="validate a whole dataset up front and print a summary",
        description="Load a data config (MindSpeed-MM data.json or mmfuse YAML), read every sample, load its "
                    "images, apply the chat template and the cut-off length, and print how many samples are "
                    "usable and why the others are not (with file and index). Exit status 1 if no sample is usable.")
    k.add_argument("config", help="data.json (dataset_param...) or a YAML file with a 'data' section")
    k.add_argument("--limit", type=int, default=None, help="process only the first N samples that pass the structural checks")
    k.add_argument("--cutoff-len", type=int, default=None,
                   help="token limit per sample, overriding the config (MindSpeed-MM takes it from --seq-length)")
    k.add_argument("--json", action="store_true", help="print the summary as JSON")
    k.set_defaults(run=run_check)

    m = dsub.add_parser(
        "make-demo", help="write a small, learnable image-question dataset, a tiny model and its train.yaml",
        description="Write DIR/data/mllm_data.json (MLLM format) with DIR/data/images/*.png (one coloured shape "
                    "per image, questions about its colour and shape), a held-out split in DIR/eval/, "
                    "DIR/data/model/ (a tiny tokenizer, preprocessor_config.json and a random-init tiny "
                    "Qwen2.5-VL checkpoint in Hugging Face format) and DIR/train.yaml, a ready run config: "
                    "`mmfuse train DIR/train.yaml`. The same --seed gives the same files.")
    m.add_argument("dir", help="output folder")
    m.add_argument("--samples", type=int, default=512, help="number of training samples (default 512)")
    m.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    m.add_argument("--force", action="store_true", help="overwrite an existing demo dataset in DIR")
    m.set_defaults(run=run_make_demo)
