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

The host loop is the CPU path's (`mmfuse.ops._lce_chunks.sweep`); this module gives it the per-chunk
cross-entropy, the allocations (on the tensors' device) and the fp32 dweight GEMM.
"""

from __future__ import annotations

import math

import torch

from mmfuse.kernels.triton import cross_entropy as _ce
from mmfuse.ops._lce_chunks import ChunkKernels

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


def chunk_kernels(hidden: torch.Tensor) -> ChunkKernels:
    """The chunk loop's parts (`mmfuse.ops._lce_chunks.sweep`) for tensors on hidden's device: fp32
    math, device allocations, the Triton CE kernel, cuBLAS dweight accumulation in fp32."""
    dev = hidden.device

    def empty(shape, dtype):
        return torch.empty(shape, dtype=dtype, device=dev)

    def ce_rows(lg, y, ignore_index, grad, scale, row_scale, loss_out):
        _ce.forward(lg, y, ignore_index, grad=grad, scale=scale, row_scale=row_scale, loss=loss_out)

    return ChunkKernels(torch.float32, empty, default_chunk_size, ce_rows, _accumulate_dweight)
