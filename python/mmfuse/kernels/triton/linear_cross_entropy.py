"""Fused linear cross-entropy for CUDA tensors: cuBLAS GEMMs around the Triton cross-entropy kernel,
one chunk of rows at a time, so the N x V logits never exist (the contract:
`mmfuse.ops.reference.linear_cross_entropy`; the design is Liger-Kernel's fused_linear_cross_entropy).

Per chunk of C rows (legend: N rows, H hidden, V vocab, C chunk rows):
  logits_CV = hidden_CH @ weight_VH^T            torch.mm into one reused [C, V] buffer (cuBLAS)
  _cross_entropy_fwd_kernel: loss_C, and logits_CV overwritten in place with d(loss)/d(logits)
  dhidden_CH = dlogits_CV @ weight_VH            torch.mm
  dweight_VH += dlogits_CV^T @ hidden_CH         fp32 accumulator (see `_accumulate_dweight`)
so the gradients are produced in the forward pass; the op's backward only scales them. Rows
labelled ignore_index are dropped before the GEMMs. No Triton GEMM: cuBLAS runs them at the card's
bf16 rate, and the CE kernel in between is memory-bound (read the chunk twice, write it once).

The host loop mirrors the CPU path (`mmfuse.ops.linear_cross_entropy._chunked`); only the per-chunk
cross-entropy, the allocations (on the tensors' device) and the fp32 dweight GEMM differ.
"""

from __future__ import annotations

import math

import torch

from mmfuse.kernels.triton import cross_entropy as _ce

# Floor of rows per chunk: GEMMs with fewer rows use the tensor cores poorly, and Liger's rule below
# gives 64 rows at N 4096 / H 2048 / V 151936.
MIN_CHUNK = 256
# Ceiling of a chunk's logits, counted as fp32 (the kernel's math width): 256 MiB, i.e. 441 rows at
# V 151936, rounded down to a power of two (256 rows: 74 MiB of bf16 logits).
LOGITS_BUDGET_BYTES = 256 << 20


def default_chunk_size(n: int, H: int, V: int) -> int:
    """Rows per chunk for `n` valid rows: Liger-Kernel's next_pow2(ceil(n / ceil(V / H))) (a chunk of
    logits about the size of hidden), at least MIN_CHUNK, at most LOGITS_BUDGET_BYTES of fp32 logits."""
    rows = math.ceil(max(n, 1) / max(math.ceil(V / max(H, 1)), 1))
    rows = max(1 << max(rows - 1, 0).bit_length(), MIN_CHUNK)
    cap = max(LOGITS_BUDGET_BYTES // (4 * max(V, 1)), 1)
    return min(rows, 1 << (cap.bit_length() - 1))


# Whether cuBLAS may accumulate bf16/fp16 products straight into the fp32 dweight
# (aten::addmm.dtype_out, torch >= 2.8); False once a call has been refused.
_FP32_OUT_GEMM = {"ok": True}


def _accumulate_dweight(dw_VH: torch.Tensor, dlogits_CV: torch.Tensor, h_CH: torch.Tensor) -> None:
    """dw_VH (fp32) += dlogits_CV^T @ h_CH, with one fp32 sum over all chunks (no per-chunk rounding)."""
    if dlogits_CV.dtype == dw_VH.dtype:
        dw_VH.addmm_(dlogits_CV.t(), h_CH)
        return
    if dw_VH.is_cuda and _FP32_OUT_GEMM["ok"]:
        try:
            # bf16 operands, fp32 accumulate and fp32 C = D: the bf16 tensor-core rate, no [V, H] temporary.
            torch.ops.aten.addmm.dtype_out(dw_VH, dlogits_CV.t(), h_CH, torch.float32, out=dw_VH)
            return
        except (RuntimeError, NotImplementedError):
            _FP32_OUT_GEMM["ok"] = False
    if dw_VH.is_cuda:
        try:  # an fp32 [V, H] product per chunk, then an add: exact, one temporary as large as dweight
            dw_VH.add_(torch.mm(dlogits_CV.t(), h_CH, out_dtype=torch.float32))
            return
        except (RuntimeError, NotImplementedError, TypeError):
            pass
    # CPU tensors (Triton's interpreter) or an old torch: widen the chunk (as the C++ path does).
    dw_VH.addmm_(dlogits_CV.t().float(), h_CH.float())


def chunked(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int, chunk_size: int,
            *, scale: float = 1.0, row_scale: torch.Tensor | None = None, need_h: bool = False,
            need_w: bool = False):
    """One sweep over row chunks: per-row losses [N] (fp32), and when asked dhidden (hidden's shape
    and dtype) and dweight [V, H] (weight's dtype, accumulated in fp32) of
    sum_rows(loss_r * scale * row_scale_r). chunk_size 0 picks `default_chunk_size`."""
    H = hidden.shape[-1]
    V = weight.shape[0]
    dev = hidden.device
    h_NH = hidden.reshape(-1, H)
    y = labels.reshape(-1)
    N = h_NH.shape[0]
    want_grad = need_h or need_w
    loss = torch.zeros(N, dtype=torch.float32, device=dev)
    dh = torch.empty((N, H), dtype=hidden.dtype, device=dev) if need_h else None
    dw = torch.zeros((V, H), dtype=torch.float32, device=dev) if need_w else None

    keep = (y != ignore_index).nonzero().squeeze(1)
    n = keep.numel()
    dense = n == N
    if n:
        h_v = h_NH.contiguous() if dense else h_NH[keep]
        y_v = y.contiguous() if dense else y[keep]
        rs_v = None
        if row_scale is not None:
            rs_v = row_scale.reshape(-1).to(device=dev, dtype=torch.float32)
            rs_v = rs_v if dense else rs_v[keep]
        w = weight.contiguous()
        C = min(chunk_size or default_chunk_size(n, H, V), n)
        buf = torch.empty((C, V), dtype=hidden.dtype, device=dev)
        loss_v = loss if dense else torch.empty(n, dtype=torch.float32, device=dev)
        dh_v = (dh if dense else torch.empty((n, H), dtype=hidden.dtype, device=dev)) if need_h else None
        for s in range(0, n, C):
            e = min(s + C, n)
            h_c = h_v[s:e]
            lg = buf[: e - s]
            torch.mm(h_c, w.t(), out=lg)
            _ce.forward(lg, y_v[s:e], ignore_index, grad=lg if want_grad else None, scale=scale,
                        row_scale=None if rs_v is None else rs_v[s:e], loss=loss_v[s:e])
            if need_h:
                torch.mm(lg, w, out=dh_v[s:e])
            if need_w:
                _accumulate_dweight(dw, lg, h_c)
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
