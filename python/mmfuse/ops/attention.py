"""`mmfuse::attention`: flash-style attention over packed (varlen) sequences, with GQA, bottom-right
causal masks and sliding windows; `attention_merge` combines partial results by their LSE (ring CP).

Shape legend: T tokens (all sequences packed), Hq / Hk query / kv heads, D head dim.
The custom op always returns (out, lse); autograd saves q, k, v, out and lse (O(T·D), never T x T)
and the backward kernel recomputes the probabilities tile by tile. lse may receive a gradient
(as it does through attention_merge); it enters the backward as dS = P * (dP - rowsum(dO * O) + dlse).
"""

from __future__ import annotations

import math

import torch

from mmfuse import _core
from mmfuse.ops import _alloc, _backend, reference
from mmfuse.ops._checks import check_float, check_same_device, dtype_code, num_threads, ptr
from mmfuse.ops._eager import FusedOp

MAX_HEAD_DIM = 256


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _check(q, k, v, cu_q, cu_k, window_left, window_right):
    op = "attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(op, name, t)
        if t.dim() != 3:
            raise ValueError(f"{op}: {name} must be [T, H, D], got shape {tuple(t.shape)}")
    check_same_device(op, q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{op}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{op}: head dim of q ({q.shape[2]}) and k/v ({k.shape[2]}) differ")
    if not 1 <= q.shape[2] <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim must be in 1..{MAX_HEAD_DIM}, got {q.shape[2]}")
    hq, hk = q.shape[1], k.shape[1]
    if hk < 1 or hq < 1 or hq % hk != 0:
        raise ValueError(f"{op}: query heads ({hq}) must be a positive multiple of kv heads ({hk})")
    if window_left < -1 or window_right < -1:
        raise ValueError(f"{op}: window values must be >= -1 (-1 = unbounded), got ({window_left}, {window_right})")
    if (cu_q is None) != (cu_k is None):
        raise ValueError(f"{op}: pass both cu_seqlens_q and cu_seqlens_k, or neither")
    if cu_q is None:
        return
    for name, cu, total in (("cu_seqlens_q", cu_q, q.shape[0]), ("cu_seqlens_k", cu_k, k.shape[0])):
        if cu.dtype != torch.int32:
            raise TypeError(f"{op}: {name} must be int32, got {cu.dtype}")
        if cu.dim() != 1 or cu.shape[0] < 1:
            raise ValueError(f"{op}: {name} must be 1-D with at least one entry, got shape {tuple(cu.shape)}")
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), "
                         f"got {cu_q.shape[0]} and {cu_k.shape[0]}")


def _check_values(cu: torch.Tensor, total: int, name: str, max_seqlen: int | None) -> None:
    """Value checks (need the data, so not under fake tensors)."""
    vals = cu.tolist()
    if vals[0] != 0 or vals[-1] != total or any(b < a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"attention: {name} must start at 0, be non-decreasing and end at {total} "
                         f"(the packed length), got {vals if len(vals) <= 8 else vals[:4] + ['...'] + vals[-2:]}")
    if max_seqlen is not None and max_seqlen >= 0 and len(vals) > 1:
        longest = max(b - a for a, b in zip(vals, vals[1:]))
        if longest > max_seqlen:
            raise ValueError(f"attention: max_seqlen for {name} is {max_seqlen} but a sequence has {longest} tokens")


def _seqlens(q, k, cu_q, cu_k):
    if cu_q is None:
        cu_q = torch.tensor([0, q.shape[0]], dtype=torch.int32)
        cu_k = torch.tensor([0, k.shape[0]], dtype=torch.int32)
    return cu_q.contiguous(), cu_k.contiguous()


def _window(window_left: int, window_right: int):
    return None if window_left < 0 and window_right < 0 else (window_left, window_right)


def _shape_args(q, k, cu_q, cu_k, scale, causal, wl, wr):
    return (ptr(cu_q), ptr(cu_k), cu_q.shape[0] - 1, q.shape[0], k.shape[0], q.shape[1], k.shape[1], q.shape[2],
            scale, causal, wl, wr, dtype_code(q), num_threads())


@FusedOp.define("mmfuse::attention")
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
               cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
               softmax_scale: float, window_left: int, window_right: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k, window_left, window_right)
    if cu_seqlens_q is not None:
        _check_values(cu_seqlens_q, q.shape[0], "cu_seqlens_q", max_seqlen_q)
        _check_values(cu_seqlens_k, k.shape[0], "cu_seqlens_k", max_seqlen_k)
    backend = _backend.select("attention", q, k, v)
    if backend == "triton":
        return _backend.triton_kernels("attention").forward(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, causal, softmax_scale, window_left, window_right)
    if backend != "cpp":
        return reference.attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale,
                                   _window(window_left, window_right))
    C = _core.require()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    cu_q, cu_k = _seqlens(q, k, cu_seqlens_q, cu_seqlens_k)
    out = _alloc.empty(q.shape, q.dtype)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=_lse_dtype(q))
    C.attention_fwd(ptr(q), ptr(k), ptr(v), ptr(out), ptr(lse),
                    *_shape_args(q, k, cu_q, cu_k, softmax_scale, causal, window_left, window_right))
    return out, lse


@_attention.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, window_left,
      window_right):
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k, window_left, window_right)
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q))


@FusedOp.define("mmfuse::attention_backward")
def _attention_backward(dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
                        cu_seqlens_k: torch.Tensor | None, causal: bool, softmax_scale: float, window_left: int,
                        window_right: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = _backend.select("attention_backward", q, k, v)
    if backend == "triton":
        return _backend.triton_kernels("attention").backward(dout, dlse, q, k, v, out, lse, cu_seqlens_q,
                                                             cu_seqlens_k, causal, softmax_scale, window_left,
                                                             window_right)
    if backend != "cpp":
        return reference.attention_backward(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal,
                                            softmax_scale, _window(window_left, window_right))
    C = _core.require()
    q, k, v, out = q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous()
    dout = dout.to(q.dtype).contiguous()
    lse = lse.contiguous()
    dlse = dlse.to(lse.dtype).contiguous() if dlse is not None else None
    cu_q, cu_k = _seqlens(q, k, cu_seqlens_q, cu_seqlens_k)
    dq = _alloc.empty(q.shape, q.dtype)
    dk = _alloc.empty(k.shape, k.dtype)
    dv = _alloc.empty(v.shape, v.dtype)
    C.attention_bwd(ptr(q), ptr(k), ptr(v), ptr(out), ptr(lse), ptr(dout), ptr(dlse), ptr(dq), ptr(dk), ptr(dv),
                    *_shape_args(q, k, cu_q, cu_k, softmax_scale, causal, window_left, window_right))
    return dq, dk, dv


@_attention_backward.register_fake
def _(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale, window_left, window_right):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, _, _, causal, scale, wl, wr = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k)
    ctx.args = (causal, scale, wl, wr)


def _attention_grad(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _attention_backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_attention.register_autograd(_attention_grad, setup_context=_attention_setup)


# ---- public API --------------------------------------------------------------------------------

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor | None = None,
              cu_seqlens_k: torch.Tensor | None = None, max_seqlen_q: int | None = None,
              max_seqlen_k: int | None = None, causal: bool = False, softmax_scale: float | None = None,
              window: tuple[int, int] | None = None, return_lse: bool = False):
    """softmax(scale · q kᵀ + mask) v per packed sequence (flash-attn's varlen convention).

    q [T, Hq, D], k/v [Tk, Hk, D] with Hq a multiple of Hk (GQA); cu_seqlens_q/k int32 [B + 1]
    (None: one sequence). causal aligns the mask bottom-right; window = (left, right), -1 unbounded.
    softmax_scale defaults to 1/sqrt(D). Returns out [T, Hq, D], and lse [Hq, T] (fp32; fp64 for fp64
    inputs) when return_lse. A query that sees no key gets out = 0 and lse = -inf.
    """
    if window is None:
        window = (-1, -1)
    if len(window) != 2:
        raise ValueError(f"attention: window must be (left, right), got {window!r}")
    d = q.shape[-1] if isinstance(q, torch.Tensor) and q.dim() >= 1 else 1
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    out, lse = _attention(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                          -1 if max_seqlen_q is None else int(max_seqlen_q),
                                          -1 if max_seqlen_k is None else int(max_seqlen_k),
                                          bool(causal), scale, int(window[0]), int(window[1]))
    return (out, lse) if return_lse else out


def attention_merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """(out, lse) of attention over the union of two disjoint key sets, from the two partial results
    (out [T, H, D], lse [H, T]). Plain PyTorch ops, so autograd and torch.compile see through it."""
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape:
        raise ValueError(f"attention_merge: shapes differ: out {tuple(out_a.shape)} vs {tuple(out_b.shape)}, "
                         f"lse {tuple(lse_a.shape)} vs {tuple(lse_b.shape)}")
    if out_a.dim() != 3 or lse_a.shape != (out_a.shape[1], out_a.shape[0]):
        raise ValueError(f"attention_merge: expected out [T, H, D] and lse [H, T], got {tuple(out_a.shape)} "
                         f"and {tuple(lse_a.shape)}")
    return reference.attention_merge(out_a, lse_a, out_b, lse_b)
