"""`mmfuse::linear_cross_entropy`: cross_entropy(hidden @ weight^T, labels) without ever holding
the N x V logits (the LM head of a 150k-vocabulary model: 4096 x 151936 fp32 logits are 2.5 GB,
and F.cross_entropy keeps two more such tensors for its backward).

Rows are processed in chunks (legend: N rows, H hidden, V vocab, C chunk rows):
  logits_CV = hidden_CH @ weight_VH^T        one torch GEMM into a reused [C, V] buffer
  CE kernel: loss_C, and logits_CV overwritten in place with d(loss)/d(logits)
  dhidden_CH = dlogits_CV @ weight_VH;  dweight_VH += dlogits_CV^T @ hidden_CH  (fp32 accumulator)
so the gradients come out of the forward pass (scaled for dloss = 1) and the backward only
multiplies them by dloss, in place. Rows labelled ignore_index are dropped before the GEMMs
(they contribute nothing), so masked prompt tokens cost no compute.

reduction='none' cannot be scaled afterwards (dweight sums rows with different dloss), so its
forward computes only the loss and its backward runs the chunked pass again with per-row scales
(one extra GEMM per chunk).

The CE kernel is the C++ core's on CPU tensors; CUDA tensors run the same loop in
`mmfuse.kernels.triton.linear_cross_entropy` (Triton CE kernel, cuBLAS GEMMs, device allocations).

bf16/fp16: the GEMMs run in the inputs' dtype (as F.linear does), the loss and softmax in fp32,
dweight is accumulated in fp32 and rounded once.
"""

from __future__ import annotations

import math

import torch

from mmfuse.ops import _alloc, _backend
from mmfuse.ops._lce_chunks import ChunkKernels, sweep
from mmfuse.ops._checks import check_float, check_same_device
from mmfuse.ops.cross_entropy import (check_label_values, check_labels, check_reduction, grad_scale, math_dtype,
                                      reduce_rows, rows_step)


MIN_CHUNK = 256


def default_chunk_size(N: int, H: int, V: int) -> int:
    """Rows per chunk: a chunk of logits about the size of hidden (Liger-Kernel's
    next_pow2(ceil(N / ceil(V / H)))), but at least MIN_CHUNK rows: CPU GEMMs with few rows
    re-stream the whole weight per chunk (1024x2048x32000 fp32 fwd+bwd, 2 cores: 64 rows 4.7 s,
    256 rows 1.5 s, F.linear + F.cross_entropy 2.7 s). 256 rows of 151936 fp32 logits are 148 MiB."""
    if N <= 0:
        return 1
    rows = math.ceil(N / max(math.ceil(V / max(H, 1)), 1))
    return max(1 << max(rows - 1, 0).bit_length(), MIN_CHUNK)


def _check(op, hidden, weight, labels, reduction, chunk_size):
    check_float(op, "hidden", hidden)
    check_float(op, "weight", weight)
    check_same_device(op, hidden=hidden, weight=weight, labels=labels)
    if hidden.dim() < 1:
        raise ValueError(f"{op}: hidden must have shape [..., H], got a scalar")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{op}: weight must have shape [V, {hidden.shape[-1]}] (H = hidden's last dim), "
                         f"got {list(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{op}: weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    check_labels(op, labels, tuple(hidden.shape[:-1]), "hidden's shape without H")
    check_reduction(op, reduction)
    if chunk_size < 0:
        raise ValueError(f"{op}: chunk_size must be positive (0 picks the default), got {chunk_size}")


def _cpu_kernels(hidden: torch.Tensor, use_cpp: bool) -> ChunkKernels:
    """The chunk loop's parts for CPU tensors (the C++ CE kernel) or the reference (any device)."""
    md = math_dtype(hidden)
    dev = hidden.device  # the CPU, or any device for the reference (float64 CUDA tensors)

    def empty(shape, dtype):
        return _alloc.empty(shape, dtype) if dev.type == "cpu" else torch.empty(shape, dtype=dtype, device=dev)

    def ce_rows(lg, y, ignore_index, grad, scale, row_scale, loss_out):
        loss_out.copy_(rows_step(lg, y, ignore_index, use_cpp=use_cpp, grad=grad, scale=scale,
                                 row_scale=row_scale)[0])

    def accumulate_dweight(dw, lg, h_c):
        if lg.dtype != md:  # bf16/fp16 chunk: widen it so the sum over chunks is rounded once
            dw.addmm_(lg.t().to(md), h_c.to(md))
        else:
            dw.addmm_(lg.t(), h_c)

    return ChunkKernels(md, empty, default_chunk_size, ce_rows, accumulate_dweight,
                        gemm_dtype=md if dev.type == "cpu" and not _native_half_gemm(hidden.dtype) else None)


def _native_half_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` matrices in hardware (oneDNN's bf16/fp16 paths: AVX-512
    BF16 / AMX, AVX-512 FP16); fp32 and fp64 count as native."""
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return True


def _sweep(backend: str, hidden, weight, labels, ignore_index, chunk_size, **kw):
    """The chunk loop on the backend's kernels: Triton's CE kernel and cuBLAS for CUDA (or forced)
    tensors, the C++ core's for CPU tensors, else the reference."""
    if backend == "triton":
        kernels = _backend.triton_kernels("linear_cross_entropy").chunk_kernels(hidden)
    else:
        kernels = _cpu_kernels(hidden, use_cpp=backend == "cpp")
    return sweep(kernels, hidden, weight, labels, ignore_index, chunk_size, **kw)


def _empty_grad(t):
    return t.new_empty((0,))


@torch.library.custom_op("mmfuse::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                          reduction: str, chunk_size: int, need_hidden_grad: bool,
                          need_weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dhidden, dweight): the gradients for dloss = 1 when asked (not for 'none'), else empty."""
    _check("linear_cross_entropy", hidden, weight, labels, reduction, chunk_size)
    check_label_values("linear_cross_entropy", labels, weight.shape[0], ignore_index)
    backend = _backend.select("linear_cross_entropy", hidden, weight)
    n_valid = int((labels != ignore_index).sum())
    need_h = need_hidden_grad and reduction != "none"
    need_w = need_weight_grad and reduction != "none"
    scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
    loss_rows, dh, dw = _sweep(backend, hidden, weight, labels, ignore_index, chunk_size, scale=scale,
                               need_h=need_h, need_w=need_w)
    loss = reduce_rows(loss_rows, n_valid, reduction, labels.shape, hidden.dtype)
    return loss, (dh if need_h else _empty_grad(hidden)), (dw if need_w else _empty_grad(weight))


@_linear_cross_entropy.register_fake
def _(hidden, weight, labels, ignore_index, reduction, chunk_size, need_hidden_grad, need_weight_grad):
    _check("linear_cross_entropy", hidden, weight, labels, reduction, chunk_size)
    loss = hidden.new_empty(labels.shape if reduction == "none" else ())
    grads = reduction != "none"
    dh = hidden.new_empty(hidden.shape) if (need_hidden_grad and grads) else _empty_grad(hidden)
    dw = weight.new_empty(weight.shape) if (need_weight_grad and grads) else _empty_grad(weight)
    return loss, dh, dw


@torch.library.custom_op("mmfuse::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward(dloss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                                   labels: torch.Tensor, ignore_index: int, reduction: str, chunk_size: int,
                                   need_hidden_grad: bool, need_weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dhidden, dweight) for dloss (per row for 'none'): the chunked pass again, with the rows scaled."""
    backend = _backend.select("linear_cross_entropy_backward", hidden, weight)
    if reduction == "none":
        scale, row_scale = 1.0, dloss
    else:
        scale, row_scale = grad_scale(dloss, int((labels != ignore_index).sum()), reduction), None
    _, dh, dw = _sweep(backend, hidden, weight, labels, ignore_index, chunk_size, scale=scale,
                       row_scale=row_scale, need_h=need_hidden_grad, need_w=need_weight_grad)
    return (dh if need_hidden_grad else _empty_grad(hidden)), (dw if need_weight_grad else _empty_grad(weight))


@_linear_cross_entropy_backward.register_fake
def _(dloss, hidden, weight, labels, ignore_index, reduction, chunk_size, need_hidden_grad, need_weight_grad):
    dh = hidden.new_empty(hidden.shape) if need_hidden_grad else _empty_grad(hidden)
    dw = weight.new_empty(weight.shape) if need_weight_grad else _empty_grad(weight)
    return dh, dw


def _lce_setup(ctx, inputs, output):
    hidden, weight, labels, ignore_index, reduction, chunk_size, need_h, need_w = inputs
    ctx.reduction, ctx.ignore_index, ctx.chunk_size = reduction, ignore_index, chunk_size
    ctx.need_h, ctx.need_w = need_h, need_w
    ctx.grads = None
    # The dhidden/dweight outputs are internal: without this, autograd would hand backward a zero
    # tensor for each of them — one more [V, H] buffer (1.2 GB at V 151936, H 2048) at the peak.
    ctx.set_materialize_grads(False)
    # Traced (torch.compile, AOT) or a tensor subclass: plain functional autograd.
    if torch.compiler.is_compiling() or type(output[1]) is not torch.Tensor:
        ctx.save_for_backward(hidden, weight, labels, output[1], output[2])
    else:
        ctx.save_for_backward(hidden, weight, labels)
        # Kept outside save_for_backward so that backward may scale them in place; detached, so
        # that ctx -> output -> grad_fn -> ctx is no reference cycle.
        if reduction != "none":
            ctx.grads = (output[1].detach(), output[2].detach())


def _lce_grad(ctx, dloss, _ddh, _ddw):
    saved = ctx.saved_tensors
    hidden, weight, labels = saved[:3]
    dh = dw = None
    if dloss is None or not (ctx.need_h or ctx.need_w):
        pass
    elif len(saved) == 5 and ctx.reduction != "none":  # traced: functional scaling
        dh, dw = saved[3] * dloss.to(saved[3].dtype), saved[4] * dloss.to(saved[4].dtype)
    elif ctx.grads is None or ctx.reduction == "none":
        # 'none' (rows scaled differently), and any backward after the first through this forward
        # (retain_graph, gradcheck): the first one handed its gradients out, scaled in place.
        dh, dw = torch.ops.mmfuse.linear_cross_entropy_backward(
            dloss, hidden, weight, labels, ctx.ignore_index, ctx.reduction, ctx.chunk_size, ctx.need_h, ctx.need_w)
    else:
        # The forward's gradients are for dloss = 1. Scaling in place (nothing to do for
        # loss.backward()) keeps one copy of dweight ([V, H], as large as the LM head) instead of two.
        dh, dw = ctx.grads
        ctx.grads = None
        g = float(dloss)
        if g != 1.0:
            dh.mul_(g)
            dw.mul_(g)
    return (dh if ctx.need_h else None), (dw if ctx.need_w else None), None, None, None, None, None, None


_linear_cross_entropy.register_autograd(_lce_grad, setup_context=_lce_setup)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean", chunk_size: int | None = None) -> torch.Tensor:
    """cross_entropy(hidden [..., H] @ weight [V, H]^T, int64 labels [...]) without materialising the
    logits: at most `chunk_size` rows of logits exist at once (default: a chunk about the size of
    hidden). Gradients for hidden and weight are computed in the forward when they require grad.
    Reductions and ignore_index as in `mmfuse.ops.cross_entropy` ('mean' over no valid rows is 0).
    """
    grad_on = torch.is_grad_enabled()
    need_h = bool(grad_on and hidden.requires_grad)
    need_w = bool(grad_on and weight.requires_grad)
    loss, _, _ = torch.ops.mmfuse.linear_cross_entropy(hidden, weight, labels, int(ignore_index), reduction,
                                                       int(chunk_size or 0), need_h, need_w)
    return loss
