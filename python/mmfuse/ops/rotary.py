"""Rotary position embeddings for Qwen2.5-VL: `mmfuse::rotary` (cos/sin tables, any pairing),
`mmfuse::apply_mrope` (text M-RoPE with the angles computed in the kernel, q and k in one call),
`mmfuse::mrope_cos_sin` (the M-RoPE tables) and `vision_rope_cos_sin` (the vision tower's 2-D tables).

Shape legend: T tokens, B batch, S sequence, H heads, D head dim, R rotary frequencies (<= D/2).

A rotation is linear in x and its transpose is the rotation by the negative angle, so every
backward is the same op with `inverse` flipped: autograd keeps only cos/sin (rotary) or the
position ids and inv_freq (apply_mrope), never an activation. Gradients with respect to cos, sin
and inv_freq are not provided (they are buffers in the models); asking for them raises.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from mmfuse import _core
from mmfuse.ops import _alloc, _backend, reference
from mmfuse.ops._checks import check_float, check_rank, check_same_device, dtype_code, num_threads, ptr
from mmfuse.ops._eager import FusedOp

_INT_DTYPES = (torch.int32, torch.int64)
_NO_TABLE_GRAD = ("{op}: gradients with respect to {names} are not provided; detach them "
                  "(they are fixed buffers in Qwen2.5-VL) or use mmfuse.ops.reference.{ref} to differentiate them")


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


# ---- checks ------------------------------------------------------------------------------------

def _check_rotary(op: str, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    check_float(op, "x", x)
    check_float(op, "cos", cos)
    check_float(op, "sin", sin)
    check_same_device(op, x=x, cos=cos, sin=sin)
    check_rank(op, "x", x, (3, 4))
    D = x.shape[-1]
    if D % 2:
        raise ValueError(f"{op}: head dim D = x.shape[-1] must be even, got x shape {_shape(x)}")
    if cos.shape != sin.shape:
        raise ValueError(f"{op}: cos and sin must have one shape, got {_shape(cos)} and {_shape(sin)}")
    if cos.dtype != sin.dtype:
        raise TypeError(f"{op}: cos and sin must have one dtype, got {cos.dtype} and {sin.dtype}")
    if cos.dtype not in (torch.float32, x.dtype):
        raise TypeError(f"{op}: cos/sin dtype {cos.dtype} must be float32 or x's dtype {x.dtype}")
    if x.dim() == 3:
        check_rank(op, "cos", cos, (2,))
        allowed = [x.shape[:1]]
        want = f"[T, R] with T = {x.shape[0]}"
    else:
        check_rank(op, "cos", cos, (2, 3))
        allowed = [x.shape[1:2], x.shape[:2]]
        want = f"[S, R] or [B, S, R] with B, S = {x.shape[0]}, {x.shape[1]}"
    if cos.shape[:-1] not in allowed:
        raise ValueError(f"{op}: cos/sin must be {want} for x of shape {_shape(x)}, got {_shape(cos)}")
    if 2 * cos.shape[-1] > D:
        raise ValueError(f"{op}: cos/sin have R = {cos.shape[-1]} frequencies but x's head dim D = {D} "
                         f"allows at most D/2 = {D // 2}")


def _check_positions(op: str, position_ids: torch.Tensor, tokens: int | None = None, batched: bool = False,
                     lead: tuple | None = None) -> None:
    """position_ids [3, T], or also [3, B, S] when `batched` (then matching `lead` = (B, S) if given)."""
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"{op}: position_ids must be a torch.Tensor, got {type(position_ids).__name__}")
    if position_ids.dtype not in _INT_DTYPES:
        raise TypeError(f"{op}: position_ids must be int64 or int32, got {position_ids.dtype}")
    ranks = (2, 3) if batched else (2,)
    if position_ids.dim() not in ranks or position_ids.shape[0] != 3:
        forms = "[3, T] or [3, B, S]" if batched else "[3, T]"
        raise ValueError(f"{op}: position_ids must be {forms} (t, h, w streams), got {_shape(position_ids)}")
    if tokens is not None and math.prod(position_ids.shape[1:]) != tokens:
        raise ValueError(f"{op}: position_ids {_shape(position_ids)} do not match the {tokens} tokens of q/k")
    if lead is not None and position_ids.dim() == 3 and tuple(position_ids.shape[1:]) != tuple(lead):
        raise ValueError(f"{op}: position_ids {_shape(position_ids)} do not match q/k's [B, S] = {list(lead)}")


def _check_inv_freq(op: str, inv_freq: torch.Tensor, mrope_section: Sequence[int], head_dim: int | None) -> None:
    check_float(op, "inv_freq", inv_freq)
    check_rank(op, "inv_freq", inv_freq, (1,))
    half = inv_freq.shape[0]
    if head_dim is not None and 2 * half != head_dim:
        raise ValueError(f"{op}: inv_freq must have D/2 = {head_dim // 2} entries for head dim {head_dim}, "
                         f"got {_shape(inv_freq)}")
    sec = list(mrope_section)
    if len(sec) != 3 or any(int(s) < 0 for s in sec) or sum(sec) != half:
        raise ValueError(f"{op}: mrope_section {sec} must have 3 non-negative entries (t, h, w) "
                         f"summing to D/2 = {half}")


def _check_mrope(op: str, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
                 mrope_section: Sequence[int], ranks=(3,)) -> None:
    check_float(op, "q", q)
    check_float(op, "k", k)
    check_same_device(op, q=q, k=k, position_ids=position_ids, inv_freq=inv_freq)
    check_rank(op, "q", q, ranks)
    check_rank(op, "k", k, ranks)
    if q.dtype != k.dtype:
        raise TypeError(f"{op}: q and k must have one dtype, got {q.dtype} and {k.dtype}")
    if q.shape[:-2] != k.shape[:-2]:
        raise ValueError(f"{op}: q and k must have the same tokens, got q {_shape(q)} and k {_shape(k)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{op}: q and k must have the same head dim, got q {_shape(q)} and k {_shape(k)}")
    if q.shape[-1] % 2:
        raise ValueError(f"{op}: head dim D must be even, got q {_shape(q)}")
    batched = 4 in ranks
    lead = tuple(q.shape[:2]) if q.dim() == 4 else None
    _check_positions(op, position_ids, math.prod(q.shape[:-2]), batched, lead)
    _check_inv_freq(op, inv_freq, mrope_section, q.shape[-1])


# ---- rotary ------------------------------------------------------------------------------------

def _rotary_cpp(x, cos, sin, interleaved, inverse):
    C = _core.require()
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    y = _alloc.empty(x.shape, x.dtype)
    H, D, R = x.shape[-2], x.shape[-1], cos.shape[-1]
    C.rotary(ptr(x), ptr(y), ptr(cos), ptr(sin), math.prod(x.shape[:-2]), H, D, R, math.prod(cos.shape[:-1]),
             dtype_code(x), dtype_code(cos), interleaved, inverse, num_threads())
    return y


@FusedOp.define("mmfuse::rotary")
def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
            inverse: bool) -> torch.Tensor:
    _check_rotary("rotary", x, cos, sin)
    backend = _backend.select("rotary", x, cos, sin)
    if backend == "cpp":
        return _rotary_cpp(x, cos, sin, interleaved, inverse)
    if backend == "triton":
        return _backend.triton_kernels("rotary").rotary(x, cos, sin, interleaved, inverse)
    return reference.rotary(x, cos, -sin if inverse else sin, interleaved)


@_rotary.register_fake
def _(x, cos, sin, interleaved, inverse):
    _check_rotary("rotary", x, cos, sin)
    return x.new_empty(x.shape)


def _rotary_setup(ctx, inputs, output):
    _, cos, sin, interleaved, inverse = inputs
    if cos.requires_grad or sin.requires_grad:
        raise NotImplementedError(_NO_TABLE_GRAD.format(op="rotary", names="cos and sin", ref="rotary"))
    ctx.save_for_backward(cos, sin)
    ctx.interleaved, ctx.inverse = interleaved, inverse


def _rotary_grad(ctx, dy):
    cos, sin = ctx.saved_tensors
    return _rotary(dy, cos, sin, ctx.interleaved, not ctx.inverse), None, None, None, None


_rotary.register_autograd(_rotary_grad, setup_context=_rotary_setup)


# ---- M-RoPE cos/sin tables ---------------------------------------------------------------------

def _mrope_cos_sin_cpp(position_ids, inv_freq, mrope_section):
    C = _core.require()
    pos = position_ids.to(torch.int64).contiguous()
    inv = inv_freq.to(torch.float32).contiguous()
    T, half = pos.shape[1], inv.shape[0]
    cos = torch.empty(T, half, dtype=torch.float32)
    sin = torch.empty(T, half, dtype=torch.float32)
    C.mrope_cos_sin(ptr(pos), ptr(inv), ptr(cos), ptr(sin), T, half, *mrope_section, num_threads())
    return cos, sin


@FusedOp.define("mmfuse::mrope_cos_sin")
def _mrope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor,
                   mrope_section: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    _check_positions("mrope_cos_sin", position_ids)
    _check_inv_freq("mrope_cos_sin", inv_freq, mrope_section, None)
    check_same_device("mrope_cos_sin", position_ids=position_ids, inv_freq=inv_freq)
    if _backend.select("mrope_cos_sin", position_ids, inv_freq) == "cpp":
        return _mrope_cos_sin_cpp(position_ids, inv_freq, mrope_section)
    cos, sin = reference.mrope_cos_sin(position_ids, inv_freq, mrope_section)
    return cos.contiguous(), sin.contiguous()  # the reference's are transposed views; the fake promises [T, D/2] rows


@_mrope_cos_sin.register_fake
def _(position_ids, inv_freq, mrope_section):
    _check_positions("mrope_cos_sin", position_ids)
    _check_inv_freq("mrope_cos_sin", inv_freq, mrope_section, None)
    shape = (position_ids.shape[1], inv_freq.shape[0])
    return inv_freq.new_empty(shape, dtype=torch.float32), inv_freq.new_empty(shape, dtype=torch.float32)


# ---- fused M-RoPE ------------------------------------------------------------------------------

def _apply_mrope_cpp(q, k, position_ids, inv_freq, mrope_section, inverse):
    C = _core.require()
    q, k = q.contiguous(), k.contiguous()
    pos = position_ids.to(torch.int64).contiguous()
    inv = inv_freq.to(torch.float32).contiguous()
    q_out = _alloc.empty(q.shape, q.dtype)
    k_out = _alloc.empty(k.shape, k.dtype)
    T, D = q.shape[0], q.shape[-1]
    C.mrope(ptr(q), ptr(q_out), q.shape[1], ptr(k), ptr(k_out), k.shape[1], ptr(pos), ptr(inv), T, D,
            *mrope_section, dtype_code(q), inverse, num_threads())
    return q_out, k_out


def _apply_mrope_reference(q, k, position_ids, inv_freq, mrope_section, inverse):
    cos, sin = reference.mrope_cos_sin(position_ids, inv_freq, mrope_section)
    if inverse:
        sin = -sin
    return reference.rotary(q, cos, sin), reference.rotary(k, cos, sin)


@FusedOp.define("mmfuse::apply_mrope")
def _apply_mrope(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
                 mrope_section: list[int], inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check_mrope("apply_mrope", q, k, position_ids, inv_freq, mrope_section)
    backend = _backend.select("apply_mrope", q, k, position_ids, inv_freq)
    if backend == "cpp":
        return _apply_mrope_cpp(q, k, position_ids, inv_freq, mrope_section, inverse)
    if backend == "triton":
        return _backend.triton_kernels("mrope").apply_mrope(q, k, position_ids, inv_freq, mrope_section, inverse)
    return _apply_mrope_reference(q, k, position_ids, inv_freq, mrope_section, inverse)


@_apply_mrope.register_fake
def _(q, k, position_ids, inv_freq, mrope_section, inverse):
    _check_mrope("apply_mrope", q, k, position_ids, inv_freq, mrope_section)
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _apply_mrope_setup(ctx, inputs, output):
    q, k, position_ids, inv_freq, mrope_section, inverse = inputs
    if inv_freq.requires_grad:
        raise NotImplementedError(_NO_TABLE_GRAD.format(op="apply_mrope", names="inv_freq", ref="apply_mrope"))
    ctx.save_for_backward(position_ids, inv_freq)
    ctx.mrope_section, ctx.inverse = mrope_section, inverse
    ctx.shapes, ctx.dtype = (q.shape, k.shape), q.dtype


def _apply_mrope_grad(ctx, dq, dk):
    position_ids, inv_freq = ctx.saved_tensors
    if dq is None:
        dq = position_ids.new_zeros(ctx.shapes[0], dtype=ctx.dtype)
    if dk is None:
        dk = position_ids.new_zeros(ctx.shapes[1], dtype=ctx.dtype)
    dq_in, dk_in = _apply_mrope(dq, dk, position_ids, inv_freq, ctx.mrope_section, not ctx.inverse)
    return dq_in, dk_in, None, None, None, None


_apply_mrope.register_autograd(_apply_mrope_grad, setup_context=_apply_mrope_setup)


# ---- public API --------------------------------------------------------------------------------

def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate the first 2R channels of x by the angles whose cos/sin are given; fp32 math (fp64 for
    fp64 x), output in x's dtype.

    x [T, H, D] with cos/sin [T, R], or x [B, S, H, D] with cos/sin [S, R] (shared by the batch) or
    [B, S, R]; R <= D/2, D even; cos/sin in float32 or x's dtype. Rotate-half pairs channels
    (i, i + R) (Qwen2.5-VL text and vision); `interleaved=True` pairs (2i, 2i + 1). Channels beyond
    2R pass through. Differentiable in x only.
    """
    return _rotary(x, cos, sin, bool(interleaved), False)


def mrope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_section: Sequence[int]):
    """(cos, sin) float32 of the M-RoPE angles float(position_ids[stream(j), t]) * inv_freq[j], where
    frequency j takes stream t, h or w by the section [t, h, w] = mrope_section it falls in (HF's
    `Qwen2_5_VLRotaryEmbedding` before its cat(freqs, freqs) doubling and dtype cast).

    position_ids [3, T] gives [T, D/2]; HF's [3, B, S] is flattened to [3, B*S] and the tables come
    back as [B, S, D/2], ready for `rotary` on x [B, S, H, D]. inv_freq [D/2] is used in float32.
    """
    sec = [int(s) for s in mrope_section]
    _check_positions("mrope_cos_sin", position_ids, batched=True)
    _check_inv_freq("mrope_cos_sin", inv_freq, sec, None)
    shape = (*position_ids.shape[1:], inv_freq.shape[0])
    cos, sin = _mrope_cos_sin(position_ids.reshape(3, -1), inv_freq, sec)
    return cos.view(shape), sin.view(shape)


def apply_mrope(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
                mrope_section: Sequence[int]):
    """(q_out, k_out): M-RoPE (Qwen2-VL / Qwen2.5-VL, rotate-half pairing) on q and k in one pass,
    with the angles computed in the kernel from the position ids (the [T, D] cos/sin tables are
    never built). Equals `rotary(q, *mrope_cos_sin(...))`, `rotary(k, ...)`.

    q [T, Hq, D] and k [T, Hk, D] with position_ids [3, T]; or q [B, S, Hq, D], k [B, S, Hk, D]
    with position_ids [3, B, S]. inv_freq [D/2] (used in float32), mrope_section [t, h, w] summing
    to D/2. fp32 math, outputs in q's dtype. Differentiable in q and k.
    """
    sec = [int(s) for s in mrope_section]
    _check_mrope("apply_mrope", q, k, position_ids, inv_freq, sec, ranks=(3, 4))
    if q.dim() == 4:
        q3, k3 = q.flatten(0, 1), k.flatten(0, 1)
        q_out, k_out = _apply_mrope(q3, k3, position_ids.reshape(3, -1), inv_freq, sec, False)
        return q_out.view(q.shape), k_out.view(k.shape)
    return _apply_mrope(q, k, position_ids.reshape(3, -1), inv_freq, sec, False)


def vision_rope_cos_sin(grid_thw: torch.Tensor, head_dim: int, spatial_merge_size: int = 2,
                        theta: float = 10000.0):
    """(cos, sin) float32 [N_patches, head_dim/2] for the Qwen2.5-VL vision tower, patches in the
    processor's order (frames, then 2x2 merge groups row-major, then row/column inside a group):
    channels [0, head_dim/4) rotate by the patch row, [head_dim/4, head_dim/2) by its column
    (HF's `Qwen2_5_VLVisionRotaryEmbedding` with `get_vision_position_ids`, before the window
    permutation). Use with `rotary(q, cos, sin)`.

    grid_thw [N_images, 3] (t, h, w) in patches, h and w divisible by spatial_merge_size. The
    output length depends on grid_thw's values, so this is a plain function of torch ops (not a
    custom op); it is vectorised over images (no per-image Python loop).
    """
    grid = torch.as_tensor(grid_thw)
    op = "vision_rope_cos_sin"
    if grid.dtype.is_floating_point or grid.dtype.is_complex or grid.dtype == torch.bool:
        raise TypeError(f"{op}: grid_thw must hold integers, got {grid.dtype}")
    if grid.dim() != 2 or grid.shape[1] != 3:
        raise ValueError(f"{op}: grid_thw must be [N_images, 3] (t, h, w), got {_shape(grid)}")
    m = int(spatial_merge_size)
    if m < 1:
        raise ValueError(f"{op}: spatial_merge_size must be >= 1, got {spatial_merge_size}")
    if head_dim <= 0 or head_dim % 4:
        raise ValueError(f"{op}: head_dim must be a positive multiple of 4 (h and w halves of D/2), got {head_dim}")
    grid = grid.to(torch.int64)
    if (grid < 0).any() or (grid[:, 1:] % m).any():
        raise ValueError(f"{op}: grid_thw entries must be >= 0 with h and w divisible by "
                         f"spatial_merge_size = {m}, got {grid.tolist()}")
    device = grid.device
    dim = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))

    t, h, w = grid.unbind(-1)
    counts = t * h * w
    n = int(counts.sum())
    image = torch.repeat_interleave(torch.arange(grid.shape[0], device=device), counts, output_size=n)
    local = torch.arange(n, device=device) - (torch.cumsum(counts, 0) - counts)[image]
    hh, ww = h[image], w[image]
    in_frame = local % (hh * ww)                           # frames repeat the same layout
    group, in_group = in_frame // (m * m), in_frame % (m * m)
    hpos = (group // (ww // m)) * m + in_group // m
    wpos = (group % (ww // m)) * m + in_group % m
    pos = torch.stack((hpos, wpos), dim=-1).to(torch.float32)          # [N, 2]
    angles = (pos[:, :, None] * inv_freq).flatten(1)                   # [N, dim]: h freqs then w freqs
    return angles.cos(), angles.sin()
