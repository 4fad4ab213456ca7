"""Point-to-point exchanges between neighbouring pipeline stages, for tensors whose shape changes from
micro-batch to micro-batch (Qwen2.5-VL packs a different number of tokens and patches into each one,
and a vision stage of a text-only micro-batch sends an empty tensor).

One `exchange` call does what Megatron's `_communicate` does (send to next / previous, receive from
previous / next), in two rounds:

  1. headers: a fixed-size int64 tensor [ndim, dtype code, dims..., 0-padding] per message;
  2. data: the tensors themselves, sized from the headers (a zero-element tensor sends nothing).

Each round is one `batch_isend_irecv` group (a NCCL group on GPU, plain isend/irecv on gloo), posted
in Megatron's even/odd rank order. The schedules (pipeline_schedule.py) follow Megatron's call
sequences, in which every call on a rank is matched by complementary calls of its neighbours, so the
sends and receives between any pair of ranks come in the same order on both sides; NCCL ignores tags
and needs exactly that. Receives are waited for at once; send handles (and the tensors they read) are
kept until `wait_sends`, so a send never stalls the sender's compute.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mmfuse.parallel.state import ParallelState

MAX_NDIM = 6
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool)
_CODE = {d: i for i, d in enumerate(_DTYPES)}


def encode_header(t: torch.Tensor) -> torch.Tensor:
    if t.ndim > MAX_NDIM:
        raise ValueError(f"pipeline p2p sends tensors of at most {MAX_NDIM} dims, got shape {tuple(t.shape)}")
    if t.dtype not in _CODE:
        raise ValueError(f"pipeline p2p cannot send dtype {t.dtype}; known: {', '.join(map(str, _DTYPES))}")
    dims = list(t.shape) + [0] * (MAX_NDIM - t.ndim)
    return torch.tensor([t.ndim, _CODE[t.dtype], *dims], dtype=torch.int64)


def decode_header(h: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype]:
    values = h.tolist()
    ndim, code = values[0], values[1]
    return tuple(values[2:2 + ndim]), _DTYPES[code]


class PipelineP2P:
    """Exchanges of one rank with its pipeline neighbours (wrapping around: with virtual stages the
    last rank's chunk c feeds the first rank's chunk c + 1)."""

    def __init__(self, state: ParallelState, device: torch.device | str = "cpu"):
        pp, r = state.pp, state.pp_rank
        self.group = state.pp_group
        self.next = state.pp_ranks[(r + 1) % pp]
        self.prev = state.pp_ranks[(r - 1) % pp]
        self.even = r % 2 == 0
        self.device = torch.device(device)
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []

    def exchange(self, send_next: torch.Tensor | None = None, send_prev: torch.Tensor | None = None,
                 recv_prev: bool = False, recv_next: bool = False
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Send/receive in one step; returns (from previous, from next). Received floating tensors
        require grad, so the backward of the stage that consumes them leaves the gradient to send back."""
        sends = {"next": _detached(send_next), "prev": _detached(send_prev)}
        recvs = {"prev": recv_prev, "next": recv_next}
        headers = {k: encode_header(t).to(self.device) for k, t in sends.items() if t is not None}
        got = {k: torch.empty(2 + MAX_NDIM, dtype=torch.int64, device=self.device) for k, on in recvs.items() if on}
        self._round(headers, got)

        out = {}
        for k, h in got.items():
            shape, dtype = decode_header(h)
            out[k] = torch.empty(shape, dtype=dtype, device=self.device)
        self._round({k: t for k, t in sends.items() if t is not None and t.numel()},
                    {k: t for k, t in out.items() if t.numel()})
        for t in out.values():
            if t.is_floating_point():
                t.requires_grad_()
        return out.get("prev"), out.get("next")

    def _round(self, sends: dict[str, torch.Tensor], recvs: dict[str, torch.Tensor]) -> None:
        peer = {"next": self.next, "prev": self.prev}
        send_next = [dist.P2POp(dist.isend, sends["next"], self.next, self.group)] if "next" in sends else []
        send_prev = [dist.P2POp(dist.isend, sends["prev"], self.prev, self.group)] if "prev" in sends else []
        recv_prev = [dist.P2POp(dist.irecv, recvs["prev"], peer["prev"], self.group)] if "prev" in recvs else []
        recv_next = [dist.P2POp(dist.irecv, recvs["next"], peer["next"], self.group)] if "next" in recvs else []
        # Megatron's order (p2p_communication._p2p_ops): with pp = 2 the previous and next rank are
        # the same peer, and this order keeps its forward and backward messages in step on both sides.
        if self.even:
            ops = send_next + recv_prev + send_prev + recv_next
        else:
            ops = recv_prev + send_next + recv_next + send_prev
        if not ops:
            return
        works = dist.batch_isend_irecv(ops)
        for op, work in zip(ops, works):
            if op.op is dist.irecv:
                work.wait()
            else:
                self._pending.append((work, op.tensor))

    def wait_sends(self) -> None:
        """Block until every send posted so far has completed (end of a step). Not called when a
        schedule fails: a dead peer would never take the message, and the error must surface now."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().contiguous()
