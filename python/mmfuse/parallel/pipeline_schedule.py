"""Pipeline-parallel forward and backward of one optimizer step, in Megatron-core's schedules
(pipeline_parallel/schedules.py):

  pp == 1               forward then backward of each micro-batch (no pipelining)
  pp > 1, vpp == 1      1F1B: pp − rank − 1 warm-up forwards, then one forward / one backward, then
                        the remaining backwards
  pp > 1, vpp > 1       interleaved 1F1B over model chunks: virtual stage v = chunk·pp + rank, micro-
                        batches in groups of pp; needs micro-batches % pp == 0, as Megatron does

The rank-local compute (which chunk, which micro-batch, when) and the communication calls mirror
Megatron's, call for call: that sequence is what keeps the sends and receives of any two neighbours in
the same order on both sides (p2p.py). A stage is `stage_forward` of models/qwen2_5_vl/pipeline.py;
what passes between stages changes shape per micro-batch, so shapes travel with the tensors.

With overlap_p2p (Megatron's overlap_p2p_comm) the same compute runs in the same order; only where
the waits fall changes, so the results are bit-identical to the non-overlapped schedule
(tests/parallel/test_pipeline_overlap.py):

  tagged protocol (gloo)   each result is sent as soon as it exists and each input or output
                           gradient is received on a handle posted before the compute ahead of its
                           use, then waited for only when its forward or backward starts (1F1B and
                           interleaved)
  ordered protocol (any)   Megatron's overlapped interleaved schedule: a forward's exchange is posted
                           before the backward that follows it, and the backward's before the next
                           forward; 1F1B runs its exchanges waited at once, as Megatron does
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager

import torch
import torch.distributed as dist

from mmfuse.models.qwen2_5_vl.pipeline import StageSpec, keep_only, stage_forward, stage_specs
from mmfuse.parallel.layout import ParallelLayout
from mmfuse.parallel.p2p import PipelineP2P
from mmfuse.parallel.state import ParallelState

Chunk = tuple[torch.nn.Module, StageSpec]


def build_pipeline_chunks(model: torch.nn.Module, layout: ParallelLayout, state: ParallelState) -> list[Chunk]:
    """This rank's (model, spec) per chunk c = 0..vpp-1, i.e. virtual stages c·pp + pp_rank. All chunks
    share one model object that keeps (in place) only the layers of this rank's stages, so no
    parameter exists twice on a rank and names stay global (`model.layers.17.…`)."""
    vit, llm = layout.stage_layers(model.cfg)
    specs = stage_specs(vit, llm)
    mine = [specs[c * layout.pp + state.pp_rank] for c in range(layout.vpp)]
    keep_only(model, mine)
    return [(model, spec) for spec in mine]


def forward_backward(chunks: list[Chunk], micro_batches: list[dict[str, Any]], state: ParallelState,
                     loss_scale: float, transforms: Any = None,
                     grad_sync: Callable[[bool], ContextManager] | None = None,
                     overlap_p2p: bool = True, p2p_protocol: str = "auto") -> tuple[float, int]:
    """Forward and backward of all micro-batches of one step on this rank. The last virtual stage
    backpropagates loss_sum · loss_scale (loss_scale = 1 / label tokens of the whole step, from the
    caller). grad_sync(is_last_backward) gives the context each backward runs in (the data-parallel
    reducer's no_sync for all but the last). Returns (summed loss, label tokens) of the micro-batches
    whose loss this rank computed: zeros except on the last stage. overlap_p2p: post receives ahead
    of their use. p2p_protocol (p2p.py): 'tagged' (gloo only; receives posted ahead freely, 1F1B and
    interleaved), 'ordered' (any backend; Megatron's matched exchanges, overlapped in the interleaved
    schedule only, as Megatron does), 'auto' = tagged on gloo, ordered elsewhere."""
    if p2p_protocol not in ("auto", "tagged", "ordered"):
        raise ValueError(f"p2p_protocol must be 'auto', 'tagged' or 'ordered', got {p2p_protocol!r}")
    pp, vpp, n = state.pp, len(chunks), len(micro_batches)
    if vpp != state.layout.vpp:
        raise ValueError(f"{vpp} model chunks given, but the layout has vpp = {state.layout.vpp}")
    if vpp > 1 and n % pp:
        raise ValueError(f"the interleaved pipeline schedule (vpp = {vpp}) runs micro-batches in groups of "
                         f"pp = {pp}: {n} micro-batches per step is not a multiple of {pp}; change the "
                         "gradient accumulation steps or set vpp = 1")
    stages = _Stages(chunks, micro_batches, loss_scale, transforms, grad_sync)
    if pp == 1:
        for m in range(n):
            stages.forward(0, m, None)
            stages.backward(0, None)
    else:
        device = micro_batches[0]["input_ids"].device
        p2p = PipelineP2P(state, device)
        if p2p_protocol == "auto":
            p2p_protocol = "tagged" if p2p.tagged_supported() else "ordered"
        if p2p_protocol == "tagged" and not p2p.tagged_supported():
            raise ValueError("the tagged pipeline p2p protocol needs the gloo backend (it matches receives by "
                             "tag); use 'ordered' or 'auto'")
        if overlap_p2p and p2p_protocol == "tagged":
            order = _one_f_one_b_order(pp, state.pp_rank, n) if vpp == 1 else \
                _interleaved_order(pp, state.pp_rank, vpp, n)
            _run_overlapped(stages, p2p, order, state.pp_rank == 0, state.pp_rank == pp - 1)
        elif vpp == 1:
            _one_f_one_b(stages, p2p, pp, state.pp_rank, n)
        else:
            _interleaved(stages, p2p, pp, state.pp_rank, vpp, n, overlap=overlap_p2p)
        p2p.wait_sends()
    return float(stages.loss_sum), stages.tokens


class _Stages:
    """Forward/backward of (chunk, micro-batch) on this rank, with the tensors kept between the two."""

    def __init__(self, chunks, batches, loss_scale, transforms, grad_sync):
        self.chunks, self.batches, self.loss_scale, self.transforms = chunks, batches, loss_scale, transforms
        self.grad_sync = grad_sync or (lambda is_last: contextlib.nullcontext())
        self.saved: list[list[tuple[torch.Tensor | None, torch.Tensor]]] = [[] for _ in chunks]
        self.backwards_left = len(chunks) * len(batches)
        self.loss_sum: torch.Tensor | float = 0.0   # stays on the device until the step ends (no sync per micro-batch)
        self.tokens = 0

    def forward(self, c: int, m: int, x_in: torch.Tensor | None) -> torch.Tensor | None:
        """Runs chunk c on micro-batch m; returns what goes to the next stage (None from the last)."""
        model, spec = self.chunks[c]
        out = stage_forward(model, spec, self.batches[m], x_in, self.transforms)
        if spec.head:
            self.loss_sum = self.loss_sum + out.loss_sum.detach().float()
            self.tokens += out.num_label_tokens
            self.saved[c].append((x_in, out.loss_sum * self.loss_scale))
            return None
        self.saved[c].append((x_in, out))
        return out

    def backward(self, c: int, grad_out: torch.Tensor | None) -> torch.Tensor | None:
        """Backward of chunk c's oldest stored micro-batch (each chunk runs its backwards in forward
        order); returns the gradient for the previous stage, None on the first. The stored tensors
        are dropped here, so a micro-batch's activations live from its forward to its backward."""
        x_in, y = self.saved[c].pop(0)
        self.backwards_left -= 1
        # The context is entered even when there is nothing to backpropagate (a vision stage of a
        # text-only micro-batch made a fresh empty tensor), so the reducer always sees its last backward.
        with self.grad_sync(self.backwards_left == 0):
            if y.requires_grad:
                torch.autograd.backward(y, grad_out)
        if x_in is None:
            return None
        # The first decoder stage ignores the (empty) vision input of a text-only micro-batch.
        return x_in.grad if x_in.grad is not None else torch.zeros_like(x_in)


def _one_f_one_b(st: _Stages, p2p: PipelineP2P, pp: int, rank: int, n: int) -> None:
    first, last = rank == 0, rank == pp - 1
    warmup = min(pp - rank - 1, n)
    remaining = n - warmup

    def recv_forward():
        return p2p.exchange(recv_prev=not first)[0]

    for m in range(warmup):
        y = st.forward(0, m, recv_forward())
        p2p.exchange(send_next=y)
    x = recv_forward() if remaining else None
    for i in range(remaining):
        y = st.forward(0, warmup + i, x)
        _, g = p2p.exchange(send_next=y, recv_next=not last)
        g_in = st.backward(0, g)
        if i == remaining - 1:
            p2p.exchange(send_prev=g_in)
        else:
            x, _ = p2p.exchange(send_prev=g_in, recv_prev=not first)
    for _ in range(warmup):
        _, g = p2p.exchange(recv_next=not last)
        p2p.exchange(send_prev=st.backward(0, g))


def _interleaved(st: _Stages, p2p: PipelineP2P, pp: int, rank: int, vpp: int, n: int, overlap: bool) -> None:
    """Megatron's forward_backward_pipelining_with_interleaving, with or without its overlap_p2p_comm.
    Iteration k of either direction works on chunk chunk_id(k) and micro-batch micro_batch_id(k).

    Without overlap, an iteration ends with one exchange that waits for the next iteration's inputs.
    With it, the forward's exchange (send the output, receive the next input) is posted before the
    backward and the backward's (send the input gradient, receive the next output gradient) before
    the next forward; each is waited for just before the compute that uses what it receives. The
    exchanges are posted at the same points on every rank and pair up as in Megatron (p2p.py)."""
    first, last = rank == 0, rank == pp - 1
    total, group = n * vpp, pp * vpp

    def chunk_id(k: int, forward: bool) -> int:
        c = (k % group) // pp
        return c if forward else vpp - 1 - c

    def micro_batch_id(k: int) -> int:
        return (k // group) * pp + k % pp

    inputs: list[list[torch.Tensor]] = [[] for _ in range(vpp)]   # received activations, per chunk
    grads: list[list[torch.Tensor]] = [[] for _ in range(vpp)]    # received output gradients, per chunk
    in_flight = {"F": None, "B": None}                             # posted exchanges, by the compute that waits

    def settle(kind: str) -> None:
        if in_flight[kind] is not None:
            in_flight[kind].wait()
            in_flight[kind] = None

    def forward(k: int) -> torch.Tensor | None:
        settle("F")
        c = chunk_id(k, True)
        return st.forward(c, micro_batch_id(k), None if first and c == 0 else inputs[c].pop(0))

    def backward(k: int) -> torch.Tensor | None:
        settle("B")
        c = chunk_id(k, False)
        return st.backward(c, None if last and c == vpp - 1 else grads[c].pop(0))

    # With exactly pp micro-batches all forwards run first (Megatron: "all warmup").
    all_warmup = n == pp
    warmup = total if all_warmup else min((pp - rank - 1) * 2 + (vpp - 1) * pp, total)
    remaining = total - warmup

    x, _ = p2p.exchange(recv_prev=not first)
    if not first:
        inputs[0].append(x)
    for k in range(warmup):
        y = forward(k)
        next_c = chunk_id(k + 1, True)
        recv_prev = not (first and next_c == 0) and k != total - 1
        ends_warmup = k == warmup - 1 and not all_warmup
        if overlap:
            in_flight["F"] = p2p.post_exchange(send_next=y, recv_prev=recv_prev)
            x = in_flight["F"].from_prev
            if ends_warmup:
                in_flight["B"] = p2p.post_exchange(recv_next=not last)
                g = in_flight["B"].from_next
        elif ends_warmup:
            x, g = p2p.exchange(send_next=y, recv_prev=recv_prev, recv_next=not last)
        else:
            x, _ = p2p.exchange(send_next=y, recv_prev=recv_prev)
        if ends_warmup and not last:
            grads[vpp - 1].append(g)
        if recv_prev:
            inputs[next_c].append(x)

    for k in range(remaining):
        fk, bk = k + warmup, k
        y = forward(fk)
        recv_prev = True
        if first:
            # The first rank runs pp − 1 iterations ahead of the last, whose output it receives.
            next_fc = chunk_id(fk - (pp - 1), True)
            recv_prev = next_fc != vpp - 1
            next_fc += 1
        else:
            next_fc = chunk_id(fk + 1, True)
        if k == remaining - 1:
            recv_prev = False
        if overlap:
            in_flight["F"] = p2p.post_exchange(send_next=y, recv_prev=recv_prev)
        g_in = backward(bk)
        recv_next = True
        if last:
            next_bc = chunk_id(bk - (pp - 1), False)
            recv_next = next_bc != 0
            next_bc -= 1
        else:
            next_bc = chunk_id(bk + 1, False)
        if overlap:
            in_flight["B"] = p2p.post_exchange(send_prev=g_in, recv_next=recv_next)
            x, g = in_flight["F"].from_prev, in_flight["B"].from_next
        else:
            x, g = p2p.exchange(send_next=y, send_prev=g_in, recv_prev=recv_prev, recv_next=recv_next)
        if recv_prev:
            inputs[next_fc].append(x)
        if recv_next:
            grads[next_bc].append(g)

    settle("F")
    settle("B")
    if all_warmup and not last:
        grads[vpp - 1].append(p2p.exchange(recv_next=True)[1])
    for k in range(remaining, total):
        g_in = backward(k)
        next_bc = chunk_id(k + 1, False)
        recv_next = not (last and next_bc == vpp - 1) and k != total - 1
        _, g = p2p.exchange(send_prev=g_in, recv_next=recv_next)
        if recv_next:
            grads[next_bc].append(g)


# ---- overlapped p2p: the same compute order, receives posted ahead ---------------------------------

Op = tuple[str, int, int]   # ("F", chunk, micro-batch) or ("B", chunk, -1): backwards take their chunk's oldest


def _one_f_one_b_order(pp: int, rank: int, n: int) -> list[Op]:
    """The compute order of `_one_f_one_b`: warm-up forwards, one forward / one backward, cool-down."""
    warmup = min(pp - rank - 1, n)
    order: list[Op] = [("F", 0, m) for m in range(warmup)]
    for i in range(n - warmup):
        order += [("F", 0, warmup + i), ("B", 0, -1)]
    return order + [("B", 0, -1)] * warmup


def _interleaved_order(pp: int, rank: int, vpp: int, n: int) -> list[Op]:
    """The compute order of `_interleaved` (Megatron's chunk_id / micro_batch_id of iteration k)."""
    total, group = n * vpp, pp * vpp

    def fwd(k: int) -> Op:
        return ("F", (k % group) // pp, (k // group) * pp + k % pp)

    def bwd(k: int) -> Op:
        return ("B", vpp - 1 - (k % group) // pp, -1)

    warmup = total if n == pp else min((pp - rank - 1) * 2 + (vpp - 1) * pp, total)
    order = [fwd(k) for k in range(warmup)]
    for k in range(total - warmup):
        order += [fwd(k + warmup), bwd(k)]
    return order + [bwd(k) for k in range(total - warmup, total)]


def _run_overlapped(st: _Stages, p2p: PipelineP2P, order: list[Op], first: bool, last: bool) -> None:
    """Runs `order`, sending each result at once and keeping up to two receives of each direction
    posted ahead of their use. Receives of one direction are consumed in the order the neighbour
    sends them: every rank runs the same sequence of (chunk, micro-batch) forwards and of chunk
    backwards, so the previous rank's outputs arrive in the order this rank's forwards take them
    (for rank 0, the last rank's chunk c feeds chunk c + 1), and likewise for gradients."""
    vpp = len(st.chunks)

    def takes_input(c: int) -> bool:        # not the first virtual stage
        return not (first and c == 0)

    def takes_grad(c: int) -> bool:         # not the last virtual stage (it starts from the loss)
        return not (last and c == vpp - 1)

    want = {"F": sum(op == "F" and takes_input(c) for op, c, _ in order),
            "B": sum(op == "B" and takes_grad(c) for op, c, _ in order)}
    side = {"F": "prev", "B": "next"}
    posted: dict[str, list] = {"F": [], "B": []}
    taken = {"F": 0, "B": 0}

    def post_ahead() -> None:
        # The receive for the current op and the next one of each direction are posted before this
        # op computes: the next micro-batch's input arrives while this one runs.
        for kind in ("F", "B"):
            while len(posted[kind]) < min(taken[kind] + 2, want[kind]):
                posted[kind].append(p2p.post_recv(side[kind]))

    def take(kind: str) -> torch.Tensor:
        t = posted[kind][taken[kind]].wait()
        posted[kind][taken[kind]] = None     # the step's inputs are not kept past their use
        taken[kind] += 1
        return t

    for op, c, m in order:
        post_ahead()
        if op == "F":
            y = st.forward(c, m, take("F") if takes_input(c) else None)
            if takes_grad(c):                # its output feeds another stage
                p2p.send("next", y)
        else:
            g_in = st.backward(c, take("B") if takes_grad(c) else None)
            if takes_input(c):
                p2p.send("prev", g_in)


def sync_tied_embedding_grads(model: torch.nn.Module, state: ParallelState) -> None:
    """With tied word embeddings the first decoder stage (embedding) and the last stage (LM head) each
    hold `model.embed_tokens.weight`; both copies must take the same update, from the summed
    gradient. Call after the step's backward. Megatron all-reduces over an embedding group of just
    those two ranks; here the whole pipeline group takes part, ranks without the matrix adding zeros
    (one group fewer to build, and correct for any split, including both uses on one rank)."""
    if state.pp == 1 or not model.cfg.text.tie_word_embeddings:
        return
    weight = getattr(model.model.embed_tokens, "weight", None)
    if weight is not None:
        grad = weight.grad if weight.grad is not None else torch.zeros_like(weight)
    else:
        some = next(model.parameters(), None)
        dtype, device = (some.dtype, some.device) if some is not None else (torch.float32, "cpu")
        # a tensor-parallel embedding holds vocab_size / tp rows on each rank
        grad = torch.zeros(model.cfg.text.vocab_size // state.tp, model.cfg.text.hidden_size, dtype=dtype,
                           device=device)
    dist.all_reduce(grad, group=state.pp_group)
    if weight is not None:
        weight.grad = grad
