"""LLaVA-Instruct (`{id, image, conversations: [{from, value}]}`) to the MLLM format
(`{images, messages: [{role, content}]}`), like MindSpeed-MM's llava_instruct_2_mllm_demo_format.py
but counting every skipped sample with its reason instead of dropping it silently."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmfuse.data.atomic import write_text_atomic
from mmfuse.data.mllm import IMAGE_TAG, DatasetAttr, parse_sample, read_records
from mmfuse.data.report import SampleError, SkipReport

# LLaVA speaker names -> MLLM roles; "user"/"assistant" also appear in some LLaVA-style exports.
ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class ConversionResult:
    """What convert_file did."""
    output: str                                           # file written ("" when nothing was written)
    converted: int                                        # samples written
    report: SkipReport = field(default_factory=SkipReport)  # samples skipped, per reason


def convert_record(record: Any, image_root: str | os.PathLike, absolute_paths: bool = False) -> dict[str, Any]:
    """One LLaVA record as an MLLM record; SampleError (unknown_role, missing_file,
    image_tag_mismatch, bad_record, ...) when it cannot be used."""
    if isinstance(record, SampleError):
        raise record
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise SampleError("bad_record", "expected an object with a 'conversations' list")
    messages = []
    for i, turn in enumerate(record["conversations"]):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise SampleError("bad_record", f"conversation turn {i} needs 'from' and a string 'value'")
        role = ROLE_MAP.get(turn.get("from"))
        if role is None:
            raise SampleError("unknown_role", f"turn {i} is from {turn.get('from')!r}; expected one of "
                                              f"{sorted(ROLE_MAP)}")
        messages.append({"role": role, "content": turn["value"]})
    images = []
    image = record.get("image")
    if image is not None:
        if not isinstance(image, str):
            raise SampleError("bad_record", f"'image' must be a file name, found {image!r:.80}")
        full = Path(image_root) / image
        if not full.is_file():
            raise SampleError("missing_file", f"image {image!r} not found under --image-root ({full})")
        images.append(str(full.resolve()) if absolute_paths else image)
    n_tags = sum(m["content"].count(IMAGE_TAG) for m in messages)
    if n_tags != len(images):
        raise SampleError("image_tag_mismatch", f"{n_tags} {IMAGE_TAG} tags for {len(images)} image(s)")
    out = {"images": images, "messages": messages}
    # The rules the loader applies (alternation, final answer, ...), so a converted file loads whole.
    parse_sample(out, DatasetAttr(), check_files=False)
    return out


def convert_file(input_path: str | os.PathLike, image_root: str | os.PathLike, output_path: str | os.PathLike,
                 force: bool = False, absolute_paths: bool = False) -> ConversionResult:
    """Convert a LLaVA .json/.jsonl file. Image paths are written relative to `image_root` (set
    data.json `dataset_dir` to it) unless `absolute_paths`. Refuses to overwrite `output_path`
    unless `force`; writes atomically; writes nothing when no sample converts."""
    output_path = Path(output_path)
    if output_path.exists() and not force:
        raise FileExistsError(f"{output_path} exists; pass --force to overwrite it")
    if output_path.exists() and output_path.resolve() == Path(input_path).resolve():
        raise ValueError(f"--output {output_path} is the input file; choose another path")
    if not Path(image_root).is_dir():
        raise NotADirectoryError(f"--image-root {image_root} is not a directory")
    report = SkipReport()
    converted = []
    for index, record in enumerate(read_records(input_path)):
        if record is None:
            continue
        try:
            converted.append(convert_record(record, image_root, absolute_paths))
        except SampleError as err:
            ident = record.get("id") if isinstance(record, dict) else None
            report.add(err.reason, f"{input_path}[{index}]" + (f" (id {ident})" if ident is not None else ""),
                       err.detail)
    if not converted:
        return ConversionResult(output="", converted=0, report=report)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    if output_path.suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in converted)
    else:
        # One sample per line inside the list: still one JSON document, but diffable and greppable.
        text = "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in converted) + "\n]\n"
    write_text_atomic(output_path, text)
    return ConversionResult(output=str(output_path), converted=len(converted), report=report)
