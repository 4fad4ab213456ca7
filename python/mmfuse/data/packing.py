"""Greedy packing of tokenised samples into varlen micro-batches: one token stream of at most
`seq_length` tokens with cu_seqlens marking where each sample starts, and the samples' image and
video patches concatenated in the same order as their placeholder tokens.

Shape legend: T tokens in the micro-batch, B samples, P image patch rows, D values per patch row
(channels x temporal_patch x patch x patch), N images, Pv / Nv for videos."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from mmfuse.data.report import SkipReport
from mmfuse.data.sampler import ShardedSampler


@dataclass
class ProcessedSample:
    """One sample after templating and image processing."""
    input_ids: torch.Tensor                          # [T] int64
    labels: torch.Tensor                             # [T] int64, -100 = no loss, not shifted
    pixel_values: torch.Tensor | None = None         # [P, D] image patch rows, None without images
    image_grid_thw: torch.Tensor | None = None       # [N, 3] int64
    pixel_values_videos: torch.Tensor | None = None  # [Pv, D] video patch rows
    video_grid_thw: torch.Tensor | None = None       # [Nv, 3] int64
    second_per_grid_ts: torch.Tensor | None = None   # [Nv] float32, seconds per temporal patch (M-RoPE time)
    where: str = ""                                  # "file[index]" for messages

    def __len__(self) -> int:
        return int(self.input_ids.numel())


@dataclass
class PackedBatch:
    """Several samples as one token stream (attention must not cross cu_seqlens boundaries)."""
    input_ids: torch.Tensor                          # [T] int64
    labels: torch.Tensor                             # [T] int64
    cu_seqlens: torch.Tensor                         # [B + 1] int32, 0 = cu_seqlens[0] < ... < cu_seqlens[B] = T
    pixel_values: torch.Tensor | None                # [P, D], images of all samples in order
    image_grid_thw: torch.Tensor | None              # [N, 3] int64
    pixel_values_videos: torch.Tensor | None         # [Pv, D]
    video_grid_thw: torch.Tensor | None              # [Nv, 3] int64
    second_per_grid_ts: torch.Tensor | None          # [Nv] float32
    samples: list[str] = field(default_factory=list)  # where each sample came from
    resume_state: dict | None = None                 # sampler state that continues right after this batch

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [p for p in parts if p is not None and p.numel()]
    return torch.cat(present) if present else None


def collate(samples: list[ProcessedSample]) -> PackedBatch:
    """Concatenate samples into one PackedBatch (no length check)."""
    lengths = torch.tensor([0] + [len(s) for s in samples], dtype=torch.int64)
    return PackedBatch(
        input_ids=torch.cat([s.input_ids for s in samples]),
        labels=torch.cat([s.labels for s in samples]),
        cu_seqlens=torch.cumsum(lengths, 0).to(torch.int32),
        pixel_values=_cat([s.pixel_values for s in samples]),
        image_grid_thw=_cat([s.image_grid_thw for s in samples]),
        pixel_values_videos=_cat([s.pixel_values_videos for s in samples]),
        video_grid_thw=_cat([s.video_grid_thw for s in samples]),
        second_per_grid_ts=_cat([s.second_per_grid_ts for s in samples]),
        samples=[s.where for s in samples],
    )


class Packer:
    """Fills one micro-batch in arrival order and closes it when the next sample does not fit.
    Arrival order (no sorting or look-ahead) keeps the batches a pure function of the sampler's
    order, which is what makes resuming exact."""

    def __init__(self, seq_length: int, report: SkipReport | None = None):
        if seq_length <= 0:
            raise ValueError(f"seq_length must be positive, got {seq_length}")
        self.seq_length = seq_length
        self.report = report if report is not None else SkipReport()
        self._open: list[ProcessedSample] = []
        self._tokens = 0

    def add(self, sample: ProcessedSample) -> PackedBatch | None:
        """Add a sample; returns the previous micro-batch when this sample had to start a new one.
        A sample longer than seq_length is skipped and counted as "longer_than_seq_length"."""
        n = len(sample)
        if n > self.seq_length:
            self.report.add("longer_than_seq_length", sample.where,
                            f"{n} tokens > seq_length {self.seq_length}; raise seq_length or lower image_max_pixels")
            return None
        done = None
        if self._tokens + n > self.seq_length:
            done = self.flush()
        self._open.append(sample)
        self._tokens += n
        return done

    def flush(self) -> PackedBatch | None:
        """Close the open micro-batch (None if empty)."""
        if not self._open:
            return None
        batch = collate(self._open)
        self._open, self._tokens = [], 0
        return batch


def pack(samples: Iterable[ProcessedSample], seq_length: int, report: SkipReport | None = None
         ) -> Iterator[PackedBatch]:
    """Micro-batches of at most seq_length tokens from `samples`, in order."""
    packer = Packer(seq_length, report)
    for sample in samples:
        batch = packer.add(sample)
        if batch is not None:
            yield batch
    last = packer.flush()
    if last is not None:
        yield last


def packed_stream(sampler: ShardedSampler, load: Callable[[int], ProcessedSample | None], seq_length: int,
                  report: SkipReport | None = None) -> Iterator[PackedBatch]:
    """Micro-batches for one DP rank: indices from `sampler`, samples from `load` (None = skipped,
    already counted by the loader), packed in order. Each batch carries `resume_state`: loading it
    into a fresh sampler and calling packed_stream again yields exactly the batches that follow."""
    packer = Packer(seq_length, report)
    indices = iter(sampler)
    while True:
        before = sampler.state_dict()
        try:
            index = next(indices)
        except StopIteration:
            break
        sample = load(index)
        if sample is None:
            continue
        batch = packer.add(sample)
        if batch is not None:
            # This sample opened the next batch, so a resumed run must read it again.
            batch.resume_state = before
            yield batch
    last = packer.flush()
    if last is not None:
        last.resume_state = sampler.state_dict()
        yield last
