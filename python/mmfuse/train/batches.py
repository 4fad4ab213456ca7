"""From the run config's data section to the endless stream of packed micro-batches the loop eats,
with a position that checkpoints save and resume restores."""

from __future__ import annotations

from typing import Any, Iterator

from mmfuse.data.config import DataConfig
from mmfuse.data.dataset import MLLMDataset
from mmfuse.data.packing import packed_stream
from mmfuse.data.sampler import ShardedSampler
from mmfuse.data.workers import sample_loader
from mmfuse.train.config import RunConfig, weights_dir

BATCH_FIELDS = ("input_ids", "labels", "cu_seqlens", "pixel_values", "image_grid_thw", "pixel_values_videos",
                "video_grid_thw", "second_per_grid_ts")


def data_config(cfg: RunConfig) -> DataConfig:
    """The typed data section; the tokenizer and image-processor settings default to the model's folder."""
    d = dict(cfg.data)
    if not d.get("model_name_or_path") and not d.get("tokenizer_dir"):
        d["model_name_or_path"] = str(weights_dir(cfg.model.pretrained))
    data = DataConfig.from_dict(d)
    data.validate()
    return data


class TrainBatches:
    """Packed micro-batches for one data-parallel rank. `state_dict()` is the sampler position right
    after the last batch handed out, so a resumed run continues with the next one."""

    def __init__(self, dataset: MLLMDataset, seq_length: int, seed: int, dp_rank: int = 0, dp_size: int = 1):
        if len(dataset) == 0:
            raise ValueError(f"no usable samples in {dataset.config.dataset}: {dataset.report.format()}")
        self.dataset = dataset
        self.report = dataset.report
        self.sampler = ShardedSampler(len(dataset), dp_rank, dp_size, seed=seed)
        self.seq_length = seq_length
        self._state = self.sampler.state_dict()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Workers (data.num_workers) start here, from the sampler's current (possibly resumed) position,
        # and stop when the stream is closed or fails.
        with sample_loader(self.dataset, self.sampler, self.dataset.config.num_workers) as load:
            for batch in packed_stream(self.sampler, load, self.seq_length, self.report):
                self._state = batch.resume_state
                yield {k: getattr(batch, k, None) for k in BATCH_FIELDS}

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": dict(self._state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self._state = self.sampler.state_dict()


def build_batches(cfg: RunConfig, dp_rank: int = 0, dp_size: int = 1) -> TrainBatches:
    return TrainBatches(MLLMDataset(data_config(cfg)), cfg.training.seq_length, cfg.training.seed, dp_rank, dp_size)
