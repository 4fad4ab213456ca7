"""Bit-for-bit comparison of training micro-batches (dicts of TrainBatches.BATCH_FIELDS)."""

import torch


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys()
        for k in w:
            if w[k] is None:
                assert g[k] is None, f"batch {i} {k}"
            else:
                assert g[k].dtype == w[k].dtype and torch.equal(g[k], w[k]), f"batch {i} {k}"


def take(batches, n):
    """The first n batches of a TrainBatches, closing its stream (and any workers) afterwards."""
    stream = iter(batches)
    try:
        return [next(stream) for _ in range(n)]
    finally:
        stream.close()
