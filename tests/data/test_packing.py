"""Packing tokenised samples into varlen micro-batches."""

import torch

from mmfuse.data.packing import ProcessedSample, pack
from mmfuse.data.report import SkipReport

D = 12  # values per patch row in these tests


def _sample(i, n_tokens, grids=()):
    grid = torch.tensor(grids, dtype=torch.int64).reshape(-1, 3)
    rows = int(grid.prod(-1).sum()) if len(grids) else 0
    return ProcessedSample(
        input_ids=torch.full((n_tokens,), i, dtype=torch.int64),
        labels=torch.full((n_tokens,), -i, dtype=torch.int64),
        pixel_values=torch.full((rows, D), float(i)) if rows else None,
        image_grid_thw=grid if rows else None, where=f"f[{i}]")


def test_batches_hold_at_most_seq_length_tokens_with_matching_cu_seqlens():
    samples = [_sample(i, n) for i, n in enumerate([5, 4, 3, 9, 10, 1, 1], 1)]
    batches = list(pack(samples, seq_length=10))
    assert [b.cu_seqlens.tolist() for b in batches] == [[0, 5, 9], [0, 3], [0, 9], [0, 10], [0, 1, 2]]
    for b in batches:
        assert b.num_tokens <= 10 and b.cu_seqlens.dtype == torch.int32
        assert b.labels.shape == b.input_ids.shape
        for k in range(b.num_samples):   # each segment is one whole sample
            seg = b.input_ids[b.cu_seqlens[k]:b.cu_seqlens[k + 1]]
            assert (seg == seg[0]).all()
    assert torch.cat([b.input_ids for b in batches]).tolist() == torch.cat([s.input_ids for s in samples]).tolist()


def test_media_are_concatenated_in_sample_order():
    samples = [_sample(1, 4, [[1, 2, 2]]), _sample(2, 3), _sample(3, 3, [[1, 2, 4], [1, 2, 2]])]
    (b,) = pack(samples, seq_length=16)
    assert b.image_grid_thw.tolist() == [[1, 2, 2], [1, 2, 4], [1, 2, 2]]
    assert b.pixel_values.shape == (4 + 8 + 4, D)
    assert b.pixel_values[:, 0].tolist() == [1.0] * 4 + [3.0] * 12
    assert b.pixel_values_videos is None and b.video_grid_thw is None
    assert b.samples == ["f[1]", "f[2]", "f[3]"]


def test_sample_longer_than_seq_length_is_skipped_and_counted():
    report = SkipReport()
    batches = list(pack([_sample(1, 3), _sample(2, 11), _sample(3, 4)], seq_length=10, report=report))
    assert [b.samples for b in batches] == [["f[1]", "f[3]"]]
    assert report.counts == {"longer_than_seq_length": 1}
    assert report.examples["longer_than_seq_length"][0].where == "f[2]"
