"""Overlapped pipeline p2p (parallel.overlap_p2p_comm): the schedules with receives posted ahead, in
both protocols (tagged: gloo's; ordered: Megatron's matched exchanges, the one NCCL/HCCL run, here
with the shape headers on a gloo group of their own as there), give bit-identical losses and
parameters to the schedules that wait for every receive at once, for 1F1B and interleaved 1F1B, with
micro-batches of different shapes (images, a video, a text-only one whose vision stages send an empty
tensor); the ordered overlapped interleaved schedule on four stages trains like one process; and the
tagged channels deliver each direction's messages in order however the receives of the two
directions are interleaved."""

import pytest
import torch

from mmfuse.parallel import ParallelLayout, ParallelState
from mmfuse.parallel.p2p import PipelineP2P
from mmfuse.parallel.state import build_state
from tests.parallel.spawn import run_ranks
from tests.parallel.test_pipeline_parallel import PP2_SCHEDULES, reference, train_rank
from tests.parallel.test_pipeline_parallel import STEPS as REFERENCE_STEPS

STEPS = 2


@pytest.mark.parametrize("layout_kw,n_micro", PP2_SCHEDULES)
def test_overlapped_schedules_are_bit_identical_to_the_blocking_one(layout_kw, n_micro):
    pp = layout_kw["pp"]
    blocking = run_ranks(pp, train_rank, layout_kw, n_micro, False, STEPS, timeout_s=30)
    assert blocking[-1]["losses"][0][1] > 0
    # Ordered 1F1B is the blocking exchange (nothing to overlap), which `blocking` already ran.
    protocols = ("tagged", "ordered") if layout_kw.get("vpp", 1) > 1 else ("tagged",)
    for protocol in protocols:
        overlapped = run_ranks(pp, train_rank, layout_kw, n_micro, True, STEPS, protocol, timeout_s=30)
        for got, want in zip(overlapped, blocking):
            assert got["losses"] == want["losses"], protocol
            assert got["params"].keys() == want["params"].keys()
            for name, p in got["params"].items():
                assert torch.equal(p, want["params"][name]), (protocol, name)


def test_ordered_overlapped_interleaved_schedule_on_four_stages_trains_like_one_process():
    # Four stages: previous and next are different ranks, and the wrapped chunk hand-over (rank 3 ->
    # rank 0) meets the warm-up of ranks that start their steady state at different iterations.
    layout_kw = dict(pp=4, vpp=2, vit_pp_layers=[1, 1, 1, 1, 0, 0, 0, 0], llm_pp_layers=[0, 0, 0, 0, 1, 1, 1, 1])
    ranks = run_ranks(4, train_rank, layout_kw, 8, True, REFERENCE_STEPS, "ordered", timeout_s=60)
    want = reference(8)
    assert len(ranks[-1]["losses"]) == len(want["losses"])
    for (got_loss, got_tokens), (want_loss, want_tokens) in zip(ranks[-1]["losses"], want["losses"]):
        assert got_tokens == want_tokens
        assert got_loss == pytest.approx(want_loss, rel=1e-5)
    for r in ranks:
        for name, p in r["params"].items():
            torch.testing.assert_close(p, want["params"][name], rtol=1e-4, atol=1e-5, msg=name)


def test_unknown_p2p_protocol_is_refused_before_any_work():
    from mmfuse.parallel.pipeline_schedule import forward_backward
    with pytest.raises(ValueError, match="'auto', 'tagged' or 'ordered', got 'fifo'"):
        forward_backward([], [], ParallelState.single(), 1.0, p2p_protocol="fifo")


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
