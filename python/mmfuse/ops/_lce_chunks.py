"""The chunk loop of `linear_cross_entropy`, shared by the CPU path (`mmfuse.ops.linear_cross_entropy`)
and the CUDA path (`mmfuse.kernels.triton.linear_cross_entropy`). Each backend brings what differs: the
per-chunk cross-entropy kernel, the dweight accumulation, allocation and the default chunk size.

Per chunk of C valid rows (legend: N rows, H hidden, V vocab, C chunk rows):
  logits_CV = hidden_CH @ weight_VH^T            a GEMM into one reused [C, V] buffer
  ce_rows: loss_C, and logits_CV overwritten in place with d(loss)/d(logits) when gradients are asked
  dhidden_CH = dlogits_CV @ weight_VH;  dweight_VH += dlogits_CV^T @ hidden_CH  (math-dtype accumulator)
Rows labelled ignore_index are gathered out before the GEMMs and their loss and dhidden are 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class ChunkKernels:
    """What one backend contributes to `sweep`."""

    math_dtype: torch.dtype
    # (shape, dtype) -> an uninitialised tensor on the inputs' device (the CPU path uses its own allocator)
    empty: Callable[[tuple, torch.dtype], torch.Tensor]
    # (valid rows, H, V) -> rows per chunk when the caller passes chunk_size 0
    default_chunk_size: Callable[[int, int, int], int]
    # (logits_CV, labels_C, ignore_index, grad_CV or None, scale, row_scale_C or None, loss_C out) -> None
    ce_rows: Callable[..., None]
    # (dweight_VH in the math dtype, dlogits_CV, hidden_CH) -> None: dweight += dlogits^T @ hidden
    accumulate_dweight: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
    # The dtype the chunk GEMMs run in; None: the inputs' own. A CPU without bf16/fp16 GEMM
    # instructions (AVX2) multiplies bf16 through a scalar fallback: [256, 512] x [512, 32000] took
    # 1.6 s in bf16 and 0.29 s in fp32, dhidden's [256, 32000] x [32000, 512] 26 s; widening the
    # weight once per call (0.1 s) is far cheaper, at V·H·4 bytes more memory.
    gemm_dtype: torch.dtype | None = None


def sweep(kernels: ChunkKernels, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
          ignore_index: int, chunk_size: int, *, scale: float = 1.0, row_scale: torch.Tensor | None = None,
          need_h: bool = False, need_w: bool = False):
    """One pass over row chunks: per-row losses [N] (math dtype), and when asked dhidden (hidden's
    shape and dtype) and dweight [V, H] (weight's dtype, accumulated in the math dtype and rounded
    once) of sum_rows(loss_r * scale * row_scale_r)."""
    H = hidden.shape[-1]
    V = weight.shape[0]
    dev = hidden.device
    md = kernels.math_dtype
    h_NH = hidden.reshape(-1, H)
    y = labels.reshape(-1)
    N = h_NH.shape[0]
    want_grad = need_h or need_w

    loss = torch.zeros(N, dtype=md, device=dev)
    dh = kernels.empty((N, H), hidden.dtype) if need_h else None
    dw = torch.zeros((V, H), dtype=md, device=dev) if need_w else None

    keep = (y != ignore_index).nonzero().squeeze(1)
    n = keep.numel()
    dense = n == N
    if n:
        h_v = h_NH.contiguous() if dense else h_NH[keep]
        y_v = y.contiguous() if dense else y[keep]
        rs_v = None
        if row_scale is not None:
            rs_v = row_scale.reshape(-1).to(device=dev, dtype=md)
            rs_v = rs_v if dense else rs_v[keep]
        gd = kernels.gemm_dtype or hidden.dtype
        w = weight.contiguous() if gd == weight.dtype else weight.to(gd)
        C = min(chunk_size or kernels.default_chunk_size(n, H, V), n)
        buf = kernels.empty((C, V), gd)
        loss_v = loss if dense else torch.empty(n, dtype=md, device=dev)
        dh_v = (dh if dense else torch.empty((n, H), dtype=hidden.dtype, device=dev)) if need_h else None
        for s in range(0, n, C):
            e = min(s + C, n)
            h_c = h_v[s:e].to(gd)
            lg = buf[: e - s]
            torch.mm(h_c, w.t(), out=lg)
            kernels.ce_rows(lg, y_v[s:e], ignore_index, lg if want_grad else None, scale,
                            None if rs_v is None else rs_v[s:e], loss_v[s:e])
            if need_h and gd == dh_v.dtype:
                torch.mm(lg, w, out=dh_v[s:e])
            elif need_h:
                dh_v[s:e] = torch.mm(lg, w)
            if need_w:
                kernels.accumulate_dweight(dw, lg, h_c)
        if not dense:
            loss[keep] = loss_v
            if need_h:
                dh.zero_()
                dh[keep] = dh_v
    elif need_h:
        dh.zero_()
    if dh is not None:
        dh = dh.reshape(hidden.shape)
    if dw is not None and dw.dtype != weight.dtype:
        dw = dw.to(weight.dtype)
    return loss, dh, dw
