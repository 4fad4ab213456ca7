"""`mmfuse::cross_entropy`: softmax cross-entropy over the last dim of logits, fp32 math.

The forward writes per-row losses and the log-sum-exp (lse, fp32) in one sweep over each row;
autograd saves logits, labels and lse, and the backward kernel rebuilds softmax from them
(exp(x - lse): one pass, no max/sum pass). Rows labelled `ignore_index` give loss 0 and zero
gradient; 'mean' divides by the number of other rows, and is 0 (not NaN, as F.cross_entropy
gives) when every row is ignored. CUDA tensors run the same two steps as Triton kernels
(`mmfuse.kernels.triton.cross_entropy`), CPU tensors the C++ core.

`rows_step` is the per-row building block shared with `linear_cross_entropy`: loss, and
optionally the gradient written over the logits in place.
"""

from __future__ import annotations

import torch

from mmfuse import _core
from mmfuse.ops import _alloc, _backend, reference
from mmfuse.ops._checks import check_float, check_same_device, dtype_code, num_threads, ptr

REDUCTIONS = ("mean", "sum", "none")


def math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_reduction(op: str, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")


def check_labels(op: str, labels: torch.Tensor, shape: tuple, what: str) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{op}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{op}: labels has dtype {str(labels.dtype).replace('torch.', '')}; supported: int64")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{op}: labels must have shape {list(shape)} ({what}), got {list(labels.shape)}")


def check_label_values(op: str, labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Labels must lie in [0, vocab) or equal ignore_index; names the first bad row (flat index)."""
    flat = labels.reshape(-1)
    bad = (flat != ignore_index) & ((flat < 0) | (flat >= vocab))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: labels[{i}] (flattened) = {int(flat[i])} is outside [0, {vocab}) "
                         f"and is not ignore_index ({ignore_index})")


def _check(op: str, logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> None:
    check_float(op, "logits", logits)
    check_same_device(op, logits=logits, labels=labels)
    if logits.dim() < 1:
        raise ValueError(f"{op}: logits must have at least 1 dimension (the classes), got a scalar")
    check_labels(op, labels, tuple(logits.shape[:-1]), "logits' shape without the class dim")
    check_reduction(op, reduction)


def valid_count(labels: torch.Tensor, ignore_index: int) -> int:
    return int((labels != ignore_index).sum())


def reduce_rows(loss_rows: torch.Tensor, n_valid: int, reduction: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """Rows (math dtype) -> the requested reduction, rounded once to `dtype`."""
    if reduction == "none":
        return loss_rows.reshape(shape).to(dtype)
    total = loss_rows.sum()
    if reduction == "mean":
        total = total / max(n_valid, 1)
    return total.to(dtype)


def grad_scale(dloss: torch.Tensor, n_valid: int, reduction: str) -> float:
    """The scalar factor of d(loss)/d(logits) for 'mean' and 'sum'."""
    g = float(dloss)
    return g / max(n_valid, 1) if reduction == "mean" else g


# ---- per-row building block --------------------------------------------------------------------

def rows_step(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, *, use_cpp: bool,
              lse_in: torch.Tensor | None = None, want_loss: bool = True, want_lse: bool = False,
              grad: torch.Tensor | None = None, scale: float = 1.0, row_scale: torch.Tensor | None = None):
    """Per-row loss and lse of logits [R, V] (rows may be strided, columns contiguous) in the math
    dtype; with `grad` [R, V] (may be `logits` itself), also the gradient times scale (times
    row_scale[r]). Labels are already validated."""
    R, V = logits.shape
    md = math_dtype(logits)
    # On the logits' device: the reference formulas also serve float64 CUDA tensors.
    loss = torch.empty(R, dtype=md, device=logits.device) if want_loss else None
    lse = torch.empty(R, dtype=md, device=logits.device) if want_lse else None
    if use_cpp:
        C = _core.require()
        y = labels.contiguous()
        rs = row_scale.to(md).contiguous() if row_scale is not None else None
        li = lse_in.to(md).contiguous() if lse_in is not None else None
        C.cross_entropy(ptr(logits), logits.stride(0) if R else V, ptr(y), ptr(li), ptr(loss), ptr(lse),
                        ptr(grad), (grad.stride(0) if R else V) if grad is not None else 0, float(scale), ptr(rs),
                        R, V, int(ignore_index), dtype_code(logits), num_threads())
        return loss, lse
    # Reference formulas (also the non-CPU path): same results, plain PyTorch.
    x = logits.to(md)
    valid = labels != ignore_index
    row_lse = torch.logsumexp(x, dim=-1) if lse_in is None else lse_in.to(md)
    if lse is not None:
        lse.copy_(row_lse)
    if loss is not None:
        tgt = x.gather(1, labels.clamp(0, max(V - 1, 0)).unsqueeze(1)).squeeze(1) if V else row_lse
        loss.copy_(torch.where(valid, row_lse - tgt, torch.zeros_like(row_lse)))
    if grad is not None:
        g = torch.exp(x - row_lse.unsqueeze(1))
        rows = valid.nonzero().squeeze(1)
        g[rows, labels[rows]] -= 1
        s = torch.full((R, 1), scale, dtype=md, device=logits.device)
        if row_scale is not None:
            s = s * row_scale.to(md).reshape(R, 1)
        grad.copy_(g * s * valid.to(md).unsqueeze(1))
    return loss, lse


# ---- cross_entropy -----------------------------------------------------------------------------

@torch.library.custom_op("mmfuse::cross_entropy", mutates_args=())
def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                   reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check("cross_entropy", logits, labels, reduction)
    V = logits.shape[-1]
    check_label_values("cross_entropy", labels, V, ignore_index)
    backend = _backend.select("cross_entropy", logits, labels)
    x = logits.reshape(-1, V)
    if x.numel() and x.stride(-1) != 1:
        x = x.contiguous()
    if backend == "triton":
        loss_rows, lse = _backend.triton_kernels("cross_entropy").forward(x, labels.reshape(-1), ignore_index)
    else:
        loss_rows, lse = rows_step(x, labels.reshape(-1), ignore_index, use_cpp=backend == "cpp", want_lse=True)
    n_valid = valid_count(labels, ignore_index)
    return reduce_rows(loss_rows, n_valid, reduction, labels.shape, logits.dtype), lse.reshape(labels.shape)


@_cross_entropy.register_fake
def _(logits, labels, ignore_index, reduction):
    _check("cross_entropy", logits, labels, reduction)
    shape = labels.shape if reduction == "none" else ()
    return logits.new_empty(shape), logits.new_empty(labels.shape, dtype=math_dtype(logits))


@torch.library.custom_op("mmfuse::cross_entropy_backward", mutates_args=())
def _cross_entropy_backward(dloss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                            ignore_index: int, reduction: str) -> torch.Tensor:
    V = logits.shape[-1]
    backend = _backend.select("cross_entropy_backward", logits, labels)
    if backend == "reference":
        return reference.cross_entropy_backward(dloss, logits, labels, ignore_index, reduction)
    x = logits.reshape(-1, V)
    if x.numel() and x.stride(-1) != 1:
        x = x.contiguous()
    if reduction == "none":
        scale, row_scale = 1.0, dloss.reshape(-1)
    else:
        scale, row_scale = grad_scale(dloss, valid_count(labels, ignore_index), reduction), None
    if backend == "triton":
        dx = _backend.triton_kernels("cross_entropy").backward(x, labels.reshape(-1), lse.reshape(-1), ignore_index,
                                                               scale, row_scale)
        return dx.reshape(logits.shape)
    dx = _alloc.empty(x.shape, logits.dtype)
    rows_step(x, labels.reshape(-1), ignore_index, use_cpp=True, lse_in=lse.reshape(-1), want_loss=False,
              grad=dx, scale=scale, row_scale=row_scale)
    return dx.reshape(logits.shape)


@_cross_entropy_backward.register_fake
def _(dloss, logits, labels, lse, ignore_index, reduction):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _ce_setup(ctx, inputs, output):
    logits, labels, ignore_index, reduction = inputs
    ctx.save_for_backward(logits, labels, output[1])
    ctx.ignore_index, ctx.reduction = ignore_index, reduction


def _ce_grad(ctx, dloss, dlse):
    # lse is an auxiliary output for the backward; it is not differentiable (dlse is ignored).
    logits, labels, lse = ctx.saved_tensors
    dx = torch.ops.mmfuse.cross_entropy_backward(dloss, logits, labels, lse, ctx.ignore_index, ctx.reduction)
    return dx, None, None, None


_cross_entropy.register_autograd(_ce_grad, setup_context=_ce_setup)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """Softmax cross-entropy of logits [..., V] against int64 labels [...] (classes in the LAST
    dim, unlike F.cross_entropy's dim 1), fp32 math, loss in logits' dtype.

    reduction 'mean' divides by the number of labels != ignore_index and returns 0 with zero
    gradients when there are none (F.cross_entropy returns NaN there); 'sum'; 'none' (shape of labels).
    """
    return torch.ops.mmfuse.cross_entropy(logits, labels, int(ignore_index), reduction)[0]
