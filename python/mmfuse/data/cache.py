"""The preprocessing cache: each processed sample (or the reason it was skipped) stored on disk,
keyed by everything that determines it, so a second run (or another rank) skips image decoding,
the processor and the template.

Layout: `<cache_dir>/<settings fingerprint>/<key[:2]>/<key>.safetensors`, one file per sample.
The settings fingerprint covers the tokenizer, the image-processor settings, the template and every
DataConfig field that changes a sample; changing any of them starts a fresh subfolder (with a
`settings.json` saying what it was made from). The per-sample key covers the sample's record, its
file and index, and the size and mtime of each of its media files. A file holds the tensors of the
sample plus a JSON header in the safetensors metadata (no pickle: a cache folder can be shared
without trusting it to run code). 256 subfolders keep 150k samples at ~600 files per folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from mmfuse.data.atomic import write_bytes_atomic, write_text_atomic
from mmfuse.data.mllm import MLLMSample
from mmfuse.data.packing import ProcessedSample

log = logging.getLogger(__name__)

FORMAT_VERSION = 1   # bump when the entry layout or the processing code changes what a sample is
# DataConfig fields that change a processed sample (paths, max_samples, workers and the cache itself do not:
# they decide which samples exist or how they are computed, and the per-sample key covers the rest).
RESULT_FIELDS = ("template", "cutoff_len", "train_on_prompt", "mask_history", "image_min_pixels",
                 "image_max_pixels", "video_min_pixels", "video_max_pixels", "video_fps", "video_maxlen", "attr")
TENSOR_FIELDS = ("input_ids", "labels", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                 "second_per_grid_ts")
_HEADER = "mmfuse_sample"


@dataclass
class Fetched:
    """The outcome of reading one sample: the sample, or why it was skipped (not both)."""
    sample: ProcessedSample | None
    skip: tuple[str, str] | None = None   # (reason, detail) when the sample is unusable
    cache: str = "off"                    # "off", "hit", "miss" or "corrupt" (unreadable entry, recomputed)
    cache_note: str = ""                  # what was wrong with a corrupt entry / why a write failed


def encode(fetched: Fetched) -> bytes:
    """Bytes of a safetensors file holding the sample's tensors and a JSON header."""
    s = fetched.sample
    tensors = {} if s is None else {k: getattr(s, k).contiguous() for k in TENSOR_FIELDS if getattr(s, k) is not None}
    header = {"version": FORMAT_VERSION, "where": s.where if s is not None else "", "fields": sorted(tensors),
              "skip": list(fetched.skip) if fetched.skip else None}
    return st_save(tensors, metadata={_HEADER: json.dumps(header)})


def decode(data: bytes) -> Fetched:
    """Inverse of `encode`; ValueError if the bytes are not a complete entry of this format."""
    try:
        tensors = st_load(data)
    except Exception as exc:   # safetensors raises its own error types for truncated/garbled files
        raise ValueError(f"not a safetensors file ({type(exc).__name__}: {exc})") from exc
    meta = _read_metadata(data)
    header = json.loads(meta[_HEADER])
    if header.get("version") != FORMAT_VERSION or sorted(tensors) != header.get("fields"):
        raise ValueError(f"header {header} does not match tensors {sorted(tensors)}")
    if header["skip"]:
        reason, detail = header["skip"]
        return Fetched(None, (str(reason), str(detail)))
    if "input_ids" not in tensors or "labels" not in tensors:
        raise ValueError("entry without input_ids/labels")
    return Fetched(ProcessedSample(**{k: tensors.get(k) for k in TENSOR_FIELDS}, where=header["where"]))


def _read_metadata(data: bytes) -> dict[str, str]:
    # safetensors layout: 8-byte little-endian header length, then a JSON header whose
    # "__metadata__" holds the string map given to save().
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    if _HEADER not in meta:
        raise ValueError("no mmfuse header")
    return meta


def settings_fingerprint(config: Any, tokenizer: Any, processor: Any) -> tuple[str, dict]:
    """(hex digest, the settings it was made from) for everything shared by all samples."""
    if hasattr(processor, "to_dict"):
        proc = processor.to_dict()
    else:   # a processor without to_dict: its type and public attributes
        proc = {"type": f"{type(processor).__module__}.{type(processor).__qualname__}",
                **{k: repr(getattr(processor, k)) for k in dir(processor)
                   if not k.startswith("_") and not callable(getattr(processor, k))}}
    fields = {}
    for name in RESULT_FIELDS:
        value = getattr(config, name)
        fields[name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    settings = {"version": FORMAT_VERSION, "config": fields, "processor": proc,
                # the serialised tokenizer.json (+ tokenizer_config.json): any vocabulary or special-token change
                "tokenizer_sha256": _sha256(tokenizer.backend.to_str() + json.dumps(tokenizer.config, sort_keys=True))}
    return _sha256(json.dumps(settings, sort_keys=True, default=repr)), settings


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class SampleCache:
    """Entries of one settings fingerprint under `root`. Reads never raise: an unreadable entry is
    reported as "corrupt" and recomputed; a failed write is logged and training goes on."""

    def __init__(self, root: str | os.PathLike, config: Any, tokenizer: Any, processor: Any):
        fingerprint, settings = settings_fingerprint(config, tokenizer, processor)
        self.dir = Path(root) / fingerprint[:32]
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "settings.json").is_file():
            write_text_atomic(self.dir / "settings.json", json.dumps(settings, indent=2, sort_keys=True, default=repr))

    def path(self, sample: MLLMSample) -> Path:
        """Entry file of `sample`: keyed by its record, file, index and media file stats."""
        media = []
        for p in sample.images + sample.videos:
            st = os.stat(p)
            if os.path.isdir(p):   # a video given as a folder of frames: every frame counts
                st_frames = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(Path(p).iterdir())]
                media.append([p, st_frames])
            else:
                media.append([p, st.st_size, st.st_mtime_ns])
        record = {"where": sample.where, "record": sample.to_record(), "media": media}
        key = _sha256(json.dumps(record, sort_keys=True, ensure_ascii=False))
        return self.dir / key[:2] / f"{key}.safetensors"

    def get(self, path: Path) -> Fetched | None:
        """The stored outcome, None when there is none; `cache="corrupt"` when it could not be read."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            return Fetched(None, cache="corrupt", cache_note=f"{path}: {exc}")
        try:
            fetched = decode(data)
        except Exception as exc:   # any damage (truncation, garbage, foreign file) means: recompute
            return Fetched(None, cache="corrupt", cache_note=f"{path}: {exc}")
        fetched.cache = "hit"
        return fetched

    def put(self, path: Path, fetched: Fetched) -> str:
        """Store `fetched` atomically (tmp file + os.replace: concurrent writers of the same entry
        write the same bytes, and a crash leaves no partial entry). Returns "" or why it failed."""
        try:
            path.parent.mkdir(exist_ok=True)
            write_bytes_atomic(path, encode(fetched))
            return ""
        except OSError as exc:
            log.warning("preprocessing cache: could not write %s: %s", path, exc)
            return f"{path}: {exc}"
