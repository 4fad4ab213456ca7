"""Overlapped pipeline p2p (parallel.overlap_p2p_comm): the schedules with receives posted ahead give
bit-identical losses and parameters to the schedules that wait for every receive at once, for 1F1B
and interleaved 1F1B, with micro-batches of different shapes (images, a video, a text-only one whose
vision stages send an empty tensor); and the overlapped channels deliver each direction's messages in
order however the receives of the two directions are interleaved."""

import pytest
import torch

from mmfuse.parallel import ParallelLayout
from mmfuse.parallel.p2p import PipelineP2P
from mmfuse.parallel.state import build_state
from tests.parallel.spawn import run_ranks
from tests.parallel.test_pipeline_parallel import PP2_SCHEDULES, train_rank

STEPS = 2


@pytest.mark.parametrize("layout_kw,n_micro", PP2_SCHEDULES)
def test_overlapped_schedule_is_bit_identical_to_the_blocking_one(layout_kw, n_micro):
    pp = layout_kw["pp"]
    overlapped = run_ranks(pp, train_rank, layout_kw, n_micro, True, STEPS, timeout_s=30)
    blocking = run_ranks(pp, train_rank, layout_kw, n_micro, False, STEPS, timeout_s=30)
    assert overlapped[-1]["losses"][0][1] > 0
    for got, want in zip(overlapped, blocking):
        assert got["losses"] == want["losses"]
        assert got["params"].keys() == want["params"].keys()
        for name, p in got["params"].items():
            assert torch.equal(p, want["params"][name]), name


def _channels_rank(rank, world_size):
    state = build_state(ParallelLayout(pp=2, timeout_s=30), rank, world_size)
    p2p = PipelineP2P(state)
    shapes = [(3, 2), (0, 4), (5,), (1, 1, 7)]
    if rank == 0:
        # Activations to the next stage; gradients come back. Both receives posted before any send.
        grads = [p2p.post_recv("next") for _ in shapes]
        for i, s in enumerate(shapes):
            p2p.send("next", torch.full(s, float(i)))
        got = [g.wait() for g in grads]
    else:
        # Receives of both directions posted first, then waited newest first: each resolves in order.
        acts = [p2p.post_recv("prev") for _ in shapes]
        for i, s in enumerate(shapes):
            p2p.send("prev", torch.full(s, -float(i), dtype=torch.float64))
        got = [a.wait() for a in reversed(acts)][::-1]
    p2p.wait_sends()
    return [(tuple(t.shape), t.dtype, t.requires_grad, t.flatten().tolist()) for t in got]


def test_overlapped_channels_deliver_each_direction_in_order():
    got0, got1 = run_ranks(2, _channels_rank, timeout_s=30)
    shapes = [(3, 2), (0, 4), (5,), (1, 1, 7)]
    for i, s in enumerate(shapes):
        n = torch.Size(s).numel()
        assert got0[i] == (s, torch.float64, True, [-float(i)] * n)
        assert got1[i] == (s, torch.float32, True, [float(i)] * n)
