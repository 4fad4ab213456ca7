"""Typed data configuration, read from a MindSpeed-MM `data.json` (`dataset_param` with
`preprocess_parameters`, `basic_parameters`, `attr`) or from the `data` section of an mmfuse YAML,
and validated in one place, at start-up, listing every problem at once."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmfuse.data.mllm import DatasetAttr
from mmfuse.data.template import TEMPLATE_NAMES
from mmfuse.utils.typed_config import build


@dataclass
class DataConfig:
    """Where the samples are and how they become tokens."""
    dataset: list[str] = field(default_factory=list)  # MLLM .json/.jsonl files (data.json: comma-separated string)
    dataset_dir: str | None = None         # folder media paths are looked up in first (then the path as written)
    model_name_or_path: str | None = None  # checkpoint folder with tokenizer.json (+ preprocessor_config.json)
    tokenizer_dir: str | None = None       # folder with tokenizer.json when it is not model_name_or_path
    template: str = "qwen2vl"              # chat template; only qwen2vl
    cutoff_len: int | None = None          # max tokens per sample (MindSpeed-MM takes --seq-length); None: no cut
    train_on_prompt: bool = False          # also compute loss on prompt tokens
    mask_history: bool = False             # loss on the last answer only; truncation drops oldest turns first
    max_samples: int | None = None         # read only the first N records of each file (quick trials)
    cache_dir: str | None = None           # folder of the preprocessing cache (processed samples); None: no cache
    num_workers: int = 0                   # worker processes decoding/processing samples per rank; 0: in-process
    image_min_pixels: int = 0              # images smaller than this are scaled up (NEAREST) before the processor
    image_max_pixels: int = 262144         # images larger than this are scaled down (NEAREST); data.json default
    video_min_pixels: int = 0              # same bounds per video frame
    video_max_pixels: int = 16384          # same bounds per video frame; data.json default
    video_fps: float = 2.0                 # frames sampled per second of video
    video_maxlen: int = 64                 # at most this many frames per video
    attr: DatasetAttr = field(default_factory=DatasetAttr)  # column and role names of the files
    ignored: list[str] = field(default_factory=list)        # data.json keys accepted but without effect here

    # ---- readers -------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any], base_dir: str | os.PathLike | None = None,
                  where: str = "data") -> "DataConfig":
        """From mmfuse YAML keys (the field names). Relative paths are taken relative to `base_dir`
        (the YAML file's folder) when given."""
        d = dict(d)
        if "ignored" in d:
            raise ValueError(f"{where}: 'ignored' is filled in when reading a data.json, not set by hand")
        attr = DatasetAttr.from_dict(d.pop("attr", None), where=f"{where}.attr")
        if isinstance(d.get("dataset"), str):
            d["dataset"] = _split_list(d["dataset"])
        cfg = build(cls, d, where)   # type-checks every field, suggests the closest name for a typo
        cfg.attr = attr
        if base_dir is not None:
            cfg._rebase(Path(base_dir))
        return cfg

    @classmethod
    def from_data_json(cls, d: dict[str, Any], where: str = "data.json") -> "DataConfig":
        """From a MindSpeed-MM data.json dict. Relative paths stay relative to the working directory,
        as MindSpeed-MM reads them. Keys that only tune MindSpeed-MM's preprocessing workers are
        accepted and listed in `ignored`; unknown keys raise."""
        if "dataset_param" not in d:
            raise ValueError(f"{where}: no 'dataset_param' section (is this a MindSpeed-MM data.json?)")
        known_top = {"dataset_param", "dataloader_param"}
        unknown = sorted(set(d) - known_top)
        if unknown:
            raise ValueError(f"{where}: unknown top-level keys {unknown}; known: {sorted(known_top)}")
        dp = d["dataset_param"]
        dataset_type = dp.get("dataset_type", "huggingface")
        if dataset_type != "huggingface":
            raise ValueError(f"{where}: dataset_param.dataset_type {dataset_type!r}: only 'huggingface' "
                             f"(MLLM files) is supported")
        unknown = sorted(set(dp) - {"dataset_type", "preprocess_parameters", "basic_parameters", "attr"})
        if unknown:
            raise ValueError(f"{where}: unknown dataset_param keys {unknown}")
        values: dict[str, Any] = {}
        ignored: list[str] = []
        for section, mapping in (("preprocess_parameters", _PREPROCESS_KEYS), ("basic_parameters", _BASIC_KEYS)):
            for key, value in (dp.get(section) or {}).items():
                path = f"dataset_param.{section}.{key}"
                if key in mapping:
                    values[mapping[key]] = value
                elif key in _NO_EFFECT_KEYS:
                    ignored.append(path)
                elif key in _MUST_BE_OFF and value:
                    raise ValueError(f"{where}: {path} = {value!r} is not supported ({_MUST_BE_OFF[key]})")
                elif key not in _MUST_BE_OFF:
                    raise ValueError(f"{where}: unknown key {path}; known: "
                                     f"{sorted(set(mapping) | set(_NO_EFFECT_KEYS) | set(_MUST_BE_OFF))}")
        attr = DatasetAttr.from_dict(dp.get("attr"), where=f"{where}: dataset_param.attr")
        # dataloader_param.num_workers is MindSpeed-MM's per-rank DataLoader worker count, which is what
        # num_workers is here. preprocessing_num_workers sizes its one-off HF-datasets map (all samples
        # processed up front, on one node); here processing happens while training, so it has no effect.
        loader = d.get("dataloader_param") or {}
        if loader.get("num_workers") is not None:
            values["num_workers"] = loader["num_workers"]
        if isinstance(values.get("dataset"), str):
            values["dataset"] = _split_list(values["dataset"])
        cfg = build(cls, values, f"{where}: dataset_param")
        cfg.attr, cfg.ignored = attr, ignored
        return cfg

    @property
    def model_dir(self) -> str | None:
        """Where the tokenizer and preprocessor_config.json are read from."""
        return self.tokenizer_dir or self.model_name_or_path

    def _rebase(self, base: Path) -> None:
        def rebase(p: str | None) -> str | None:
            return p if p is None or os.path.isabs(p) else str(base / p)
        self.dataset = [rebase(p) for p in self.dataset]
        self.dataset_dir = rebase(self.dataset_dir)
        self.model_name_or_path = rebase(self.model_name_or_path)
        self.tokenizer_dir = rebase(self.tokenizer_dir)
        self.cache_dir = rebase(self.cache_dir)

    # ---- validation ----------------------------------------------------------------------------

    def dataset_files(self) -> list[Path]:
        """The data files: each as written, else inside dataset_dir (first that exists)."""
        files = []
        for p in self.dataset:
            candidates = [Path(p)] + ([Path(self.dataset_dir) / p] if self.dataset_dir and not os.path.isabs(p) else [])
            files.append(next((c for c in candidates if c.is_file()), candidates[0]))
        return files

    def validate(self, need_tokenizer: bool = True) -> None:
        """Raise ValueError listing every problem, each naming the field and what to change."""
        problems = []
        if self.template not in TEMPLATE_NAMES:
            problems.append(f"template {self.template!r}: use one of {list(TEMPLATE_NAMES)}")
        if not self.dataset:
            problems.append("dataset: no data file given")
        for p, f in zip(self.dataset, self.dataset_files()):
            if not f.is_file():
                where = f" (also looked in dataset_dir {self.dataset_dir})" if self.dataset_dir else ""
                problems.append(f"dataset: file {p} not found{where}")
            elif f.suffix not in (".json", ".jsonl"):
                problems.append(f"dataset: {p} must be a .json or .jsonl file")
        if self.dataset_dir is not None and not Path(self.dataset_dir).is_dir():
            problems.append(f"dataset_dir: {self.dataset_dir} is not a directory")
        if need_tokenizer:
            name = "tokenizer_dir" if self.tokenizer_dir else "model_name_or_path"
            if not self.model_dir:
                problems.append("model_name_or_path: not set (the folder with tokenizer.json)")
            elif not (Path(self.model_dir) / "tokenizer.json").is_file():
                problems.append(f"{name}: {self.model_dir} has no tokenizer.json")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            problems.append(f"num_workers: must be an integer >= 0, got {self.num_workers!r}")
        for name in ("cutoff_len", "max_samples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                problems.append(f"{name}: must be a positive integer or null, got {value!r}")
        for kind in ("image", "video"):
            lo, hi = getattr(self, f"{kind}_min_pixels"), getattr(self, f"{kind}_max_pixels")
            if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi and hi > 0):
                problems.append(f"{kind}_min_pixels/{kind}_max_pixels: need 0 <= min <= max and max > 0, "
                                f"got {lo!r}/{hi!r}")
        if not self.video_fps > 0 or not (isinstance(self.video_maxlen, int) and self.video_maxlen > 0):
            problems.append(f"video_fps/video_maxlen: must be positive, got {self.video_fps!r}/{self.video_maxlen!r}")
        if problems:
            raise ValueError("invalid data config:\n  " + "\n  ".join(problems))


def load_data_config(path: str | os.PathLike) -> DataConfig:
    """A MindSpeed-MM data.json (JSON or YAML with `dataset_param`) or an mmfuse YAML/JSON whose
    `data` section (or the whole file) holds DataConfig fields."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml
        d = yaml.safe_load(text) or {}
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    if "dataset_param" in d:
        return DataConfig.from_data_json(d, where=str(path))
    section = d.get("data", d)
    if "dataset_param" in section:
        return DataConfig.from_data_json(section, where=f"{path}: data")
    return DataConfig.from_dict(section, base_dir=path.parent, where=f"{path}: data")


def _split_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    return [str(p) for p in value]


# data.json key -> DataConfig field
_PREPROCESS_KEYS = {k: k for k in ("model_name_or_path", "image_min_pixels", "image_max_pixels", "video_min_pixels",
                                   "video_max_pixels", "video_fps", "video_maxlen")}
_BASIC_KEYS = {k: k for k in ("template", "dataset_dir", "dataset", "cache_dir", "train_on_prompt", "mask_history",
                              "max_samples", "cutoff_len")}
# Keys that tune MindSpeed-MM's HF-datasets preprocessing (workers, batching, caching, streaming) or
# its packing, which here is always on and sized by seq_length.
_NO_EFFECT_KEYS = ("use_fast_tokenizer", "preprocessing_batch_size", "preprocessing_num_workers", "streaming",
                   "overwrite_cache", "preprocess_on_fly", "async_preprocess", "async_preprocess_buffer_size",
                   "packing", "neat_packing", "model_revision", "trust_remote_code", "hf_hub_token",
                   "use_pmcc_data")
# Keys accepted only when false/null, with the reason.
_MUST_BE_OFF = {"split_special_tokens": "special-token strings in the text are always single tokens",
                "tool_format": "tool use is not supported by this template",
                "val_dataset": "validation data is configured separately",
                "val_max_samples": "validation data is configured separately",
                "val_rate": "validation data is configured separately",
                "enable_thinking": "no thinking template for Qwen2.5-VL"}
