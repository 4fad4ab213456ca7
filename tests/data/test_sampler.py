"""The DP-sharded sampler and the packed stream: disjoint covering shards, seeded order, exact resume."""

import torch

from mmfuse.data.packing import packed_stream
from mmfuse.data.report import SkipReport
from mmfuse.data.sampler import ShardedSampler
from tests.data.test_packing import _sample


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_shards_are_disjoint_and_cover_every_sample_each_epoch():
    for n, dp in [(10, 3), (12, 4), (7, 1), (5, 5)]:
        for epoch in range(2):
            shards = [ShardedSampler(n, r, dp, seed=3).shard(epoch).tolist() for r in range(dp)]
            flat = [i for s in shards for i in s]
            assert sorted(flat) == list(range(n))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_order_is_seeded_and_changes_between_epochs():
    a, b = ShardedSampler(50, seed=1), ShardedSampler(50, seed=1)
    first = _take(iter(a), 100)
    assert first == _take(iter(b), 100)
    assert first[:50] != first[50:] and sorted(first[:50]) == sorted(first[50:]) == list(range(50))
    assert first[:50] != _take(iter(ShardedSampler(50, seed=2)), 50)
    assert _take(iter(ShardedSampler(5, shuffle=False)), 7) == [0, 1, 2, 3, 4, 0, 1]


def test_resume_continues_identically_mid_epoch_and_at_the_boundary():
    for stop in (3, 5, 6, 13):     # shard of rank 1 of 2 over 10 samples has 5 per epoch
        ref = ShardedSampler(10, dp_rank=1, dp_size=2, seed=7)
        it = iter(ref)
        _take(it, stop)
        state = ref.state_dict()
        expected = _take(it, 12)
        resumed = ShardedSampler(10, dp_rank=1, dp_size=2, seed=7)
        resumed.load_state_dict(state)
        assert _take(iter(resumed), 12) == expected


def test_resume_with_another_dp_layout_is_refused():
    state = ShardedSampler(10, 0, 2).state_dict()
    try:
        ShardedSampler(10, 0, 4).load_state_dict(state)
    except ValueError as exc:
        assert "dp_size" in str(exc)
    else:
        raise AssertionError("expected ValueError")


def test_num_epochs_bounds_the_stream():
    assert len(list(ShardedSampler(6, 1, 2, num_epochs=2))) == 6


def test_packed_stream_resumes_to_the_same_batches_despite_skipped_samples():
    lengths = [3, 7, 2, 8, 5, 5, 1, 9, 4, 6, 2, 3]

    def load(i):   # every 5th sample is unusable, as a bad image would be
        return None if i % 5 == 4 else _sample(i + 1, lengths[i])

    def run(sampler, n):
        stream = packed_stream(sampler, load, seq_length=10, report=SkipReport())
        return _take(stream, n)

    ref = run(ShardedSampler(len(lengths), seed=4), 12)
    for k in (1, 4, 7):
        sampler = ShardedSampler(len(lengths), seed=4)
        sampler.load_state_dict(ref[k - 1].resume_state)
        again = run(sampler, 12 - k)
        for a, b in zip(again, ref[k:]):
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.cu_seqlens, b.cu_seqlens)
            assert a.samples == b.samples
