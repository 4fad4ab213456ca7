"""`mmfuse data check`: read and process every sample of a configured dataset before training and
say how many are usable and why the others are not."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

from mmfuse.data.config import load_data_config
from mmfuse.data.report import SkipReport


@dataclass
class CheckSummary:
    """Outcome of checking a dataset."""
    records: int = 0                                    # samples read (usable + skipped)
    usable: int = 0                                     # samples that survive every stage
    tokens_total: int = 0                               # tokens of the usable samples
    tokens_max: int = 0                                 # longest usable sample
    image_tokens: int = 0                               # <|image_pad|> tokens of the usable samples
    video_tokens: int = 0                               # <|video_pad|> tokens of the usable samples
    report: SkipReport = field(default_factory=SkipReport)  # skipped samples per reason
    ignored_keys: list[str] = field(default_factory=list)   # data.json keys without effect

    def to_dict(self) -> dict:
        return {"records": self.records, "usable": self.usable, "tokens_total": self.tokens_total,
                "tokens_max": self.tokens_max, "tokens_mean": self.tokens_total / max(self.usable, 1),
                "image_tokens": self.image_tokens, "video_tokens": self.video_tokens,
                "ignored_keys": self.ignored_keys, **self.report.to_dict()}

    def format(self) -> str:
        mean = self.tokens_total / max(self.usable, 1)
        lines = [f"samples: {self.records}", f"usable: {self.usable}",
                 f"tokens per usable sample: mean {mean:.1f}, max {self.tokens_max}",
                 f"image tokens: {self.image_tokens}, video tokens: {self.video_tokens}", self.report.format()]
        if self.ignored_keys:
            lines.append("keys accepted without effect: " + ", ".join(self.ignored_keys))
        return "\n".join(lines)


def summarize(config_path: str | os.PathLike, limit: int | None = None, tokenizer=None,
              processor=None, cutoff_len: int | None = None) -> CheckSummary:
    """Build the dataset of `config_path` and process its samples (the first `limit` if given);
    `cutoff_len` overrides the config's."""
    from mmfuse.data.dataset import MLLMDataset

    config = load_data_config(config_path)
    if cutoff_len is not None:
        config.cutoff_len = cutoff_len
    dataset = MLLMDataset(config, tokenizer=tokenizer, processor=processor)
    summary = CheckSummary(report=dataset.report, ignored_keys=list(config.ignored))
    skipped_at_load = dataset.report.total
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for i in range(n):
        sample = dataset.load(i)
        if sample is None:
            continue
        tokens = len(sample)
        summary.usable += 1
        summary.tokens_total += tokens
        summary.tokens_max = max(summary.tokens_max, tokens)
        summary.image_tokens += int((sample.input_ids == dataset.template.image_pad).sum())
        summary.video_tokens += int((sample.input_ids == dataset.template.video_pad).sum())
    summary.records = skipped_at_load + n
    return summary


def check_dataset(config_path: str | os.PathLike, limit: int | None = None, as_json: bool = False,
                  tokenizer=None, processor=None, cutoff_len: int | None = None) -> int:
    """Print the summary; 0 if some sample is usable, 1 if none is, 2 if the config is invalid."""
    try:
        summary = summarize(config_path, limit, tokenizer, processor, cutoff_len)
    except (ValueError, FileNotFoundError, KeyError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary.to_dict(), indent=2) if as_json else summary.format())
    if not summary.usable:
        print(f"error: no usable sample in {config_path}", file=sys.stderr)
        return 1
    return 0
