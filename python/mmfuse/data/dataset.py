"""The configured dataset: MLLM files -> validated samples -> (images, videos, chat template) ->
ProcessedSample. Structure and file existence are checked for every sample when the dataset is
built; decoding and tokenising happen per sample when it is read (or come from the preprocessing
cache in `cache_dir`). A bad sample is skipped and counted in `report` with its file and index;
reading never raises for one sample.

Reading is split in two so that worker processes can do the heavy half: `fetch_sample` (decode,
process, cache; no shared state) and `record` (skip report, cache counters; in the main process)."""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from mmfuse.data.cache import Fetched, SampleCache
from mmfuse.data.config import DataConfig, load_data_config
from mmfuse.data.media import DECODER_MISSING, load_image, load_video
from mmfuse.data.mllm import MLLMSample, load_samples
from mmfuse.data.packing import ProcessedSample
from mmfuse.data.report import SampleError, SkipReport
from mmfuse.data.template import get_template
from mmfuse.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

__all__ = ["DataConfig", "ImageProcessor", "MLLMDataset", "default_processor", "load_data_config", "process_media"]


class ImageProcessor(Protocol):
    """What the dataset needs from a Qwen2-VL image processor."""
    merge_size: int
    temporal_patch_size: int

    def __call__(self, images=None, videos=None) -> dict[str, Any]:
        """pixel_values [P, D] + image_grid_thw [N, 3] for images; pixel_values_videos +
        video_grid_thw for videos (each video a list of PIL frames)."""


def default_processor(model_dir: str | None) -> ImageProcessor:
    """mmfuse's Qwen2VLImageProcessor with the settings of `<model_dir>/preprocessor_config.json`
    when there is one (else the Qwen2.5-VL defaults)."""
    from mmfuse.data.image_processor import Qwen2VLImageProcessor  # imported here: tests inject a fake

    if model_dir and (Path(model_dir) / "preprocessor_config.json").is_file():
        return Qwen2VLImageProcessor.from_pretrained(model_dir)
    return Qwen2VLImageProcessor()


class MLLMDataset:
    """Samples of the files in `config.dataset`, processed on demand. `tokenizer` and `processor`
    default to the ones in `config.model_dir`."""

    def __init__(self, config: DataConfig, tokenizer: Tokenizer | None = None,
                 processor: ImageProcessor | None = None, report: SkipReport | None = None):
        config.validate(need_tokenizer=tokenizer is None)
        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer.from_dir(config.model_dir)
        self.processor = processor if processor is not None else default_processor(config.model_dir)
        self.template = get_template(config.template, self.tokenizer,
                                     merge_size=getattr(self.processor, "merge_size", 2))
        self.report = report if report is not None else SkipReport()
        self.samples: list[MLLMSample] = []
        for path in config.dataset_files():
            self.samples += load_samples(path, config.attr, config.dataset_dir, check_files=True,
                                         max_samples=config.max_samples, report=self.report)
        _warn_if_videos_need_pyav(self.samples)
        self._bad: set[int] = set()    # indices already counted as skipped (count each sample once)
        self.cache = (SampleCache(config.cache_dir, config, self.tokenizer, self.processor)
                      if config.cache_dir else None)
        self.cache_stats: Counter = Counter()   # "hit" / "miss" / "corrupt" (recomputed) / "write_failed"

    def __len__(self) -> int:
        return len(self.samples)

    def process(self, sample: MLLMSample) -> ProcessedSample:
        """Decode media, run the processor and the template; SampleError if the sample is unusable."""
        cfg = self.config
        out = process_media(sample, cfg, self.processor)
        encoded = self.template.encode(sample.messages, sample.system, image_grid_thw=out.get("image_grid_thw"),
                                       video_grid_thw=out.get("video_grid_thw"), cutoff_len=cfg.cutoff_len,
                                       train_on_prompt=cfg.train_on_prompt, mask_history=cfg.mask_history)
        return ProcessedSample(
            input_ids=torch.tensor(encoded.input_ids, dtype=torch.int64),
            labels=torch.tensor(encoded.labels, dtype=torch.int64),
            pixel_values=out.get("pixel_values"), image_grid_thw=out.get("image_grid_thw"),
            pixel_values_videos=out.get("pixel_values_videos"), video_grid_thw=out.get("video_grid_thw"),
            second_per_grid_ts=out.get("second_per_grid_ts"), where=sample.where)

    def load(self, index: int) -> ProcessedSample | None:
        """The processed sample, or None if it is unusable (counted in `report` the first time)."""
        if index in self._bad:
            return None
        return self.record(index, self.fetch_sample(self.samples[index]))

    def fetch_sample(self, sample: MLLMSample) -> Fetched:
        """Process `sample` (or read it from the cache and store it there); touches no shared state,
        so worker processes can run it."""
        path = None
        if self.cache is not None:
            try:
                path = self.cache.path(sample)
            except OSError:   # a media file vanished since start-up: process() names it as missing
                path = None
        corrupt = ""
        if path is not None:
            hit = self.cache.get(path)
            if hit is not None and hit.cache == "hit":
                if hit.sample is not None:
                    hit.sample.where = sample.where
                return hit
            corrupt = hit.cache_note if hit is not None else ""
        try:
            fetched = Fetched(self.process(sample))
        except SampleError as err:
            fetched = Fetched(None, (err.reason, err.detail))
        except Exception as exc:   # e.g. a processor failing on an odd image: count it, keep training
            fetched = Fetched(None, ("processing_error", f"{type(exc).__name__}: {exc}"))
        if path is None:
            return fetched
        fetched.cache, fetched.cache_note = ("corrupt", corrupt) if corrupt else ("miss", "")
        # Unexpected exceptions may be transient (a network file system hiccup), and a missing video
        # decoder is a property of this installation, not of the sample: recompute those next run.
        if fetched.skip is None or fetched.skip[0] not in ("processing_error", DECODER_MISSING):
            failed = self.cache.put(path, fetched)
            if failed:
                fetched.cache_note = failed
                fetched.cache = "write_failed"
        return fetched

    def record(self, index: int, fetched: Fetched) -> ProcessedSample | None:
        """Count what `fetch_sample` found (in the process that owns the report) and return the sample."""
        if fetched.cache != "off":
            self.cache_stats[fetched.cache] += 1
            if fetched.cache in ("corrupt", "write_failed"):
                log.warning("preprocessing cache (%s): %s", fetched.cache, fetched.cache_note)
        if fetched.skip is not None:
            if index not in self._bad:
                self._bad.add(index)
                reason, detail = fetched.skip
                self.report.add(reason, self.samples[index].where, detail)
            return None
        return fetched.sample

    def for_worker(self) -> "MLLMDataset":
        """A copy without the sample list, report or counters: what a worker process needs to run
        `fetch_sample` (the samples travel with each task, so 150k records are not copied per worker)."""
        clone = copy.copy(self)
        clone.samples, clone.report, clone._bad, clone.cache_stats = [], SkipReport(), set(), Counter()
        return clone

    def __iter__(self) -> Iterator[ProcessedSample]:
        for i in range(len(self)):
            item = self.load(i)
            if item is not None:
                yield item


def process_media(sample: MLLMSample, cfg: DataConfig, processor: ImageProcessor) -> dict[str, Any]:
    """A sample's images and videos, decoded under cfg's pixel bounds and run through the processor:
    pixel_values / image_grid_thw, pixel_values_videos / video_grid_thw / second_per_grid_ts (only
    the keys of media the sample has). SampleError naming the file for unreadable media."""
    out: dict[str, Any] = {}
    if sample.images:
        images = [load_image(p, cfg.image_min_pixels, cfg.image_max_pixels) for p in sample.images]
        out.update(_run_processor(processor, images=images))
    if sample.videos:
        loaded = [load_video(p, cfg.video_min_pixels, cfg.video_max_pixels, cfg.video_fps, cfg.video_maxlen)
                  for p in sample.videos]
        out.update(_run_processor(processor, videos=[frames for frames, _ in loaded]))
        temporal = getattr(processor, "temporal_patch_size", 2)
        out["second_per_grid_ts"] = torch.tensor([temporal / rate for _, rate in loaded], dtype=torch.float32)
    return out


def _run_processor(processor: ImageProcessor, **media) -> dict[str, torch.Tensor]:
    (kind, items), = media.items()
    result = processor(**media)
    prefix = "" if kind == "images" else "_videos"
    pixels = torch.as_tensor(result[f"pixel_values{prefix}"])
    grid = torch.as_tensor(result["image_grid_thw" if kind == "images" else "video_grid_thw"]).to(torch.int64)
    grid = grid.reshape(-1, 3)
    if grid.shape[0] != len(items) or int(grid.prod(-1).sum()) != pixels.shape[0]:
        raise SampleError("processor_mismatch", f"image processor returned {grid.shape[0]} grids / "
                                                f"{pixels.shape[0]} patch rows for {len(items)} {kind}")
    return {f"pixel_values{prefix}": pixels, ("image_grid_thw" if kind == "images" else "video_grid_thw"): grid}


def _warn_if_videos_need_pyav(samples: list[MLLMSample]) -> None:
    """Say at start-up, not after an hour of skips, that video files will be skipped without PyAV."""
    files = sum(1 for s in samples for v in s.videos if not Path(v).is_dir())
    if not files:
        return
    try:
        import av  # noqa: F401
    except ImportError:
        log.warning("%d video files in the dataset need PyAV to decode (pip install av); without it each "
                    "sample holding one is skipped and counted as %s (folders of frame images need nothing)",
                    files, DECODER_MISSING)
