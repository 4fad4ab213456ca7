"""Pipeline p2p (parallel/p2p.py): shapes and dtypes travel with the tensors, empty tensors included,
and an exchange with a peer that is both previous and next (pp = 2) keeps its messages apart."""

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


def _exchange_rank(rank, world_size):
    state = build_state(ParallelLayout(pp=2, timeout_s=10), rank, world_size)
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


def test_exchange_carries_varying_shapes_dtypes_and_empty_tensors():
    sent_back, received = run_ranks(2, _exchange_rank, timeout_s=10)
    for t, (x, requires_grad) in zip(FORWARD, received):
        assert x.shape == t.shape and x.dtype == t.dtype and torch.equal(x, t)
        assert requires_grad      # so the consuming stage's backward leaves a gradient to send back
    for i, g in enumerate(sent_back):
        assert torch.equal(g.detach(), torch.full((i + 1,), -1.0))
