"""Pipeline p2p (parallel/p2p.py): shapes and dtypes travel with the tensors, empty tensors included,
and an exchange with a peer that is both previous and next (pp = 2) keeps its messages apart, with
the shape headers on the pipeline group or on a gloo group of their own (as on NCCL); posted
exchanges whose data are still in flight resolve to the right tensors when waited for later."""

import pytest
import torch

from mmfuse.parallel import ParallelLayout
from mmfuse.parallel.p2p import PipelineP2P, decode_header, encode_header
from mmfuse.parallel.state import build_state
from tests.parallel.spawn import run_ranks

# What rank 0 sends forward in turn: varying shapes, an empty vision tensor, another dtype.
FORWARD = [torch.arange(12.0).reshape(3, 4), torch.empty(0, 32), torch.arange(5, dtype=torch.float64),
           torch.ones(2, 1, 3, dtype=torch.bfloat16)]


def test_header_round_trips_shape_and_dtype():
    for t in FORWARD + [torch.zeros((), dtype=torch.int64)]:
        assert decode_header(encode_header(t)) == (tuple(t.shape), t.dtype)


def _exchange_rank(rank, world_size, own_meta_group=False):
    state = build_state(ParallelLayout(pp=2, timeout_s=10), rank, world_size, own_meta_group=own_meta_group)
    assert (state.pp_meta_group is state.pp_group) != own_meta_group
    p2p = PipelineP2P(state)
    got = []
    for i, t in enumerate(FORWARD):
        if rank == 0:
            # Forward to next and a gradient-like reply from next, in one call (rank 1 is both).
            _, back = p2p.exchange(send_next=t, recv_next=True)
            got.append(back)
        else:
            x, _ = p2p.exchange(recv_prev=True, send_prev=torch.full((i + 1,), -1.0))
            got.append((x.detach(), x.requires_grad))
    p2p.wait_sends()
    return got


@pytest.mark.parametrize("own_meta_group", [False, True], ids=["headers-on-pp-group", "headers-on-own-group"])
def test_exchange_carries_varying_shapes_dtypes_and_empty_tensors(own_meta_group):
    sent_back, received = run_ranks(2, _exchange_rank, own_meta_group, timeout_s=10)
    for t, (x, requires_grad) in zip(FORWARD, received):
        assert x.shape == t.shape and x.dtype == t.dtype and torch.equal(x, t)
        assert requires_grad      # so the consuming stage's backward leaves a gradient to send back
    for i, g in enumerate(sent_back):
        assert torch.equal(g.detach(), torch.full((i + 1,), -1.0))


def _posted_rank(rank, world_size):
    state = build_state(ParallelLayout(pp=2, timeout_s=10), rank, world_size, own_meta_group=True)
    p2p = PipelineP2P(state)
    if rank == 0:
        # Every exchange posted before any is waited for, then waited newest first.
        posted = [p2p.post_exchange(send_next=t, recv_next=True) for t in FORWARD]
        got = [ex.wait()[1].detach() for ex in reversed(posted)][::-1]
    else:
        got = []
        for i in range(len(FORWARD)):
            ex = p2p.post_exchange(recv_prev=True, send_prev=torch.full((i + 1,), float(i)))
            got.append(ex.wait()[0].detach())
    p2p.wait_sends()
    return got


def test_posted_exchanges_resolve_in_order_when_waited_later():
    replies, received = run_ranks(2, _posted_rank, timeout_s=10)
    for t, x in zip(FORWARD, received):
        assert x.dtype == t.dtype and torch.equal(x, t)
    for i, g in enumerate(replies):
        assert torch.equal(g, torch.full((i + 1,), float(i)))
