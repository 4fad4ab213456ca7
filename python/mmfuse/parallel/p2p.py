"""Point-to-point exchanges between neighbouring pipeline stages, for tensors whose shape changes from
micro-batch to micro-batch (Qwen2.5-VL packs a different number of tokens and patches into each one,
and a vision stage of a text-only micro-batch sends an empty tensor).

Every message is a fixed-size header [ndim, dtype code, dims..., 0-padding] and then the data. The
headers are CPU tensors on the pipeline's gloo group (`ParallelState.pp_meta_group`: the pipeline
group itself on gloo, a gloo twin of it on NCCL/HCCL), so reading a shape never waits for the device;
the data travel on the pipeline group.

Two protocols:

- **ordered** (any backend). `post_exchange` does what Megatron's `_communicate` does (send to next /
  previous, receive from previous / next) in two rounds, each one `batch_isend_irecv` group (a NCCL
  group on GPU) posted in Megatron's even/odd rank order: the headers, waited for at once, then the
  data. The schedules (pipeline_schedule.py) follow Megatron's call sequences, in which every call on
  a rank is matched by complementary calls of its neighbours, so the sends and receives between any
  pair of ranks come in the same order on both sides, and the two directions of a pair meet inside
  one group; NCCL ignores tags and needs exactly that. `exchange` waits for the data receives at once;
  a posted exchange is waited for when its tensors are used (Megatron's overlap_p2p_comm: the
  interleaved schedule posts a forward's exchange before the backward that follows it).
- **tagged** (gloo only; `tagged_supported`). `send` / `post_recv`: a schedule posts a receive before
  the compute that precedes its use and waits for it only when the tensor is needed, so a rank no
  longer stops between compute steps to meet its neighbour. The two directions travel on their own
  tags (activations to the next stage: header 1, data 2; gradients to the previous stage: header 3,
  data 4), so the receives of one direction can be posted in any position relative to those of the
  other: gloo matches a receive to the oldest send of the same source and tag. Within one direction,
  receives resolve strictly in posting order (a `Recv` first resolves the older ones of its channel),
  which is the order the neighbour sends in. The data receive is posted once the header is in:
  gloo's works do not report completion before `wait()`, so that happens when the tensor is asked for
  (the sender's data is already on its way; gloo writes at `isend`). NCCL ignores tags and would pair
  a header receive with a data send, so this protocol is for gloo only.

Send handles (and the tensors they read) are kept until `wait_sends`, so a send never stalls the
sender's compute.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mmfuse.parallel.state import ParallelState

MAX_NDIM = 6
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool)
_CODE = {d: i for i, d in enumerate(_DTYPES)}
# Header tag of each direction in the tagged protocol; the data follows on tag + 1. The ordered one uses tag 0.
_TAG = {"next": 1, "prev": 3}


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
        self.meta_group = state.pp_meta_group if state.pp_meta_group is not None else state.pp_group
        self.next = state.pp_ranks[(r + 1) % pp]
        self.prev = state.pp_ranks[(r - 1) % pp]
        self.even = r % 2 == 0
        self.device = torch.device(device)
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []
        self._channels: dict[str, list[Recv]] = {"next": [], "prev": []}   # unresolved receives, oldest first

    def exchange(self, send_next: torch.Tensor | None = None, send_prev: torch.Tensor | None = None,
                 recv_prev: bool = False, recv_next: bool = False
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Send/receive in one step; returns (from previous, from next). Received floating tensors
        require grad, so the backward of the stage that consumes them leaves the gradient to send back."""
        return self.post_exchange(send_next, send_prev, recv_prev, recv_next).wait()

    def post_exchange(self, send_next: torch.Tensor | None = None, send_prev: torch.Tensor | None = None,
                      recv_prev: bool = False, recv_next: bool = False) -> "Exchange":
        """`exchange` whose data receives are still in flight on return: the headers are in (so the
        received tensors exist, with their shapes), the data not necessarily; `.wait()` before use."""
        sends = {"next": _detached(send_next), "prev": _detached(send_prev)}
        recvs = {"prev": recv_prev, "next": recv_next}
        headers = {k: encode_header(t) for k, t in sends.items() if t is not None}
        got = {k: torch.empty(2 + MAX_NDIM, dtype=torch.int64) for k, on in recvs.items() if on}
        for work in self._round(self.meta_group, headers, got):
            work.wait()

        out = {}
        for k, h in got.items():
            shape, dtype = decode_header(h)
            out[k] = torch.empty(shape, dtype=dtype, device=self.device)
        works = self._round(self.group, {k: t for k, t in sends.items() if t is not None and t.numel()},
                            {k: t for k, t in out.items() if t.numel()})
        for t in out.values():
            if t.is_floating_point():
                t.requires_grad_()
        return Exchange(out.get("prev"), out.get("next"), works)

    def _round(self, group, sends: dict[str, torch.Tensor], recvs: dict[str, torch.Tensor]) -> list[dist.Work]:
        """Posts one batch of sends and receives on group; keeps the send handles and returns the
        receive handles."""
        send_next = [dist.P2POp(dist.isend, sends["next"], self.next, group)] if "next" in sends else []
        send_prev = [dist.P2POp(dist.isend, sends["prev"], self.prev, group)] if "prev" in sends else []
        recv_prev = [dist.P2POp(dist.irecv, recvs["prev"], self.prev, group)] if "prev" in recvs else []
        recv_next = [dist.P2POp(dist.irecv, recvs["next"], self.next, group)] if "next" in recvs else []
        # Megatron's order (p2p_communication._p2p_ops): with pp = 2 the previous and next rank are
        # the same peer, and this order keeps its forward and backward messages in step on both sides.
        if self.even:
            ops = send_next + recv_prev + send_prev + recv_next
        else:
            ops = recv_prev + send_next + recv_next + send_prev
        if not ops:
            return []
        received = []
        for op, work in zip(ops, dist.batch_isend_irecv(ops)):
            if op.op is dist.irecv:
                received.append(work)
            else:
                self._pending.append((work, op.tensor))
        return received

    # ---- tagged protocol ------------------------------------------------------------------------------

    def tagged_supported(self) -> bool:
        """Whether `send` / `post_recv` can be used: the backend must match receives by tag (gloo)."""
        return dist.get_backend(self.group) == dist.Backend.GLOO

    def send(self, to: str, t: torch.Tensor) -> None:
        """Posts header and data of t to the 'next' or 'prev' stage and returns at once; the handles
        are kept until `wait_sends`."""
        t = _detached(t)
        peer, tag = self._peer(to), _TAG[to]
        header = encode_header(t)
        self._pending.append((dist.isend(header, peer, self.meta_group, tag), header))
        if t.numel():
            self._pending.append((dist.isend(t, peer, self.group, tag + 1), t))

    def post_recv(self, frm: str) -> "Recv":
        """Posts the header receive of the next message from the 'prev' or 'next' stage; `.wait()` on
        the returned handle gives the tensor."""
        # A message from the previous stage was sent to its 'next': it travels on that direction's tags.
        channel = "next" if frm == "prev" else "prev"
        recv = Recv(self, self._peer(frm), _TAG[channel], self._channels[channel])
        self._channels[channel].append(recv)
        return recv

    def _peer(self, side: str) -> int:
        if side not in ("next", "prev"):
            raise ValueError(f"pipeline p2p side must be 'next' or 'prev', got {side!r}")
        return self.next if side == "next" else self.prev

    def wait_sends(self) -> None:
        """Block until every send posted so far has completed (end of a step). Not called when a
        schedule fails: a dead peer would never take the message, and the error must surface now."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()


class Exchange:
    """A posted `PipelineP2P.post_exchange`: the received tensors (None where nothing was asked for)
    and the handles of their data."""

    def __init__(self, from_prev: torch.Tensor | None, from_next: torch.Tensor | None, works: list[dist.Work]):
        self.from_prev, self.from_next, self._works = from_prev, from_next, works

    def wait(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Waits for the data; returns (from previous, from next)."""
        for work in self._works:
            work.wait()
        self._works = []
        return self.from_prev, self.from_next


class Recv:
    """One posted receive of the overlapped mode: the header receive is in flight; `wait()` waits for
    it, receives the data it announces and returns the tensor (floating tensors require grad, as in
    `exchange`)."""

    def __init__(self, p2p: PipelineP2P, peer: int, tag: int, channel: list["Recv"]):
        self._p2p, self._peer, self._tag, self._channel = p2p, peer, tag, channel
        self._header = torch.empty(2 + MAX_NDIM, dtype=torch.int64)
        self._work = dist.irecv(self._header, peer, p2p.meta_group, tag)
        self._tensor: torch.Tensor | None = None

    def wait(self) -> torch.Tensor:
        # Older receives of this channel take their data first: the data messages of one direction
        # arrive in the order of their headers, and gloo pairs receives with sends oldest first.
        while self._tensor is None:
            self._channel[0]._resolve()
        return self._tensor

    def _resolve(self) -> None:
        self._work.wait()
        shape, dtype = decode_header(self._header)
        t = torch.empty(shape, dtype=dtype, device=self._p2p.device)
        if t.numel():
            dist.irecv(t, self._peer, self._p2p.group, self._tag + 1).wait()
        if t.is_floating_point():
            t.requires_grad_()
        self._tensor = t
        self._channel.pop(0)


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().contiguous()
