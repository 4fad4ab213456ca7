"""Pure-PyTorch reference implementations: the exact contract of every mmfuse op and the oracle
the tests compare against (in float64). Differentiable through ordinary autograd; slow on purpose
(clarity over speed). Shape legend: T tokens, H heads, D head dim, R rotary frequencies (<= D/2)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 math for fp32/bf16/fp16, fp64 for fp64 (gradcheck)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---- RMSNorm -----------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Hugging Face Qwen2RMSNorm: normalise in fp32, round to x's dtype, then multiply by weight."""
    h = x.to(_math_dtype(x))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    """Closed-form (dx, dweight) of rms_norm, as the C++ kernel computes it (the rounding of the
    normalised row is treated as identity for dx, and applied for dweight)."""
    md = _math_dtype(x)
    xf = x.to(md)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xn = xf * rstd
    dyf = dy.to(md)
    g = dyf * weight.to(md)
    dx = rstd * (g - xn * (g * xn).mean(-1, keepdim=True))
    dw = (dyf * xn.to(x.dtype).to(md)).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    """(rms_norm(x + residual), x + residual); the sum is rounded to x's dtype before normalising."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


# ---- rotary embeddings -------------------------------------------------------------------------

def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate the first 2R channels of x [T, H, D] (or [B, S, H, D]) by cos/sin [T, R] (or [S, R], [B, S, R]).

    Rotate-half pairs (i, i + R); interleaved pairs (2i, 2i + 1). Channels beyond 2R are unchanged.
    """
    R = cos.shape[-1]
    md = _math_dtype(x)
    xf = x.to(md)
    c = cos.to(md)
    s = sin.to(md)
    if x.dim() == 4 and c.dim() == 2:
        c, s = c[None], s[None]          # [1, S, R] broadcast over the batch
    c, s = c.unsqueeze(-2), s.unsqueeze(-2)  # broadcast over heads
    rot, rest = xf[..., : 2 * R], xf[..., 2 * R:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
        out = torch.stack((o1, o2), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :R], rot[..., R:]
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((out, rest), dim=-1).to(x.dtype)


def mrope_stream_of_frequency(half_dim: int, mrope_section: Sequence[int]) -> torch.Tensor:
    """[half_dim] int64: which position stream (0 = t, 1 = h, 2 = w) each frequency uses."""
    if len(mrope_section) != 3 or sum(mrope_section) != half_dim:
        raise ValueError(f"mrope_section {list(mrope_section)} must have 3 entries summing to D/2 = {half_dim}")
    return torch.repeat_interleave(torch.arange(3), torch.tensor(list(mrope_section)))


def mrope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_section: Sequence[int]):
    """cos, sin [T, D/2] fp32 for M-RoPE: angle[t, j] = float(position_ids[stream(j), t]) * inv_freq[j]."""
    stream = mrope_stream_of_frequency(inv_freq.shape[0], mrope_section).to(position_ids.device)
    pos = position_ids.to(torch.float32)                # [3, T]
    angles = pos[stream].T * inv_freq.to(torch.float32)  # [T, D/2], one fp32 multiply as in HF
    return angles.cos(), angles.sin()


def apply_mrope(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
                mrope_section: Sequence[int]):
    """M-RoPE on q [T, Hq, D] and k [T, Hk, D] with rotate-half pairing (Qwen2-VL / Qwen2.5-VL)."""
    cos, sin = mrope_cos_sin(position_ids, inv_freq, mrope_section)
    return rotary(q, cos, sin), rotary(k, cos, sin)


def vision_rope_cos_sin(grid_thw: torch.Tensor, head_dim: int, spatial_merge_size: int = 2,
                        theta: float = 10000.0):
    """cos, sin [N, head_dim/2] fp32 for the Qwen2.5-VL vision tower, patches in the processor's
    order (2x2 merge groups contiguous): channels [0, head_dim/4) rotate by the row index h,
    [head_dim/4, head_dim/2) by the column index w."""
    dim = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    m = spatial_merge_size
    rows = []
    for t, h, w in grid_thw.tolist():
        hpos = torch.arange(h).unsqueeze(1).expand(-1, w)
        wpos = torch.arange(w).unsqueeze(0).expand(h, -1)
        hpos = hpos.reshape(h // m, m, w // m, m).permute(0, 2, 1, 3).flatten()
        wpos = wpos.reshape(h // m, m, w // m, m).permute(0, 2, 1, 3).flatten()
        rows.append(torch.stack((hpos, wpos), dim=-1).repeat(t, 1))
    pos = torch.cat(rows).to(torch.float32)                        # [N, 2]
    angles = (pos[:, :, None] * inv_freq[None, None, :]).flatten(1)  # [N, dim]: h freqs then w freqs
    return angles.cos(), angles.sin()


# ---- SwiGLU ------------------------------------------------------------------------------------

def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in fp32 math, one rounding to gate's dtype."""
    md = _math_dtype(gate)
    return (F.silu(gate.to(md)) * up.to(md)).to(gate.dtype)


def swiglu_packed(x: torch.Tensor) -> torch.Tensor:
    """swiglu of the two halves of the last dim: [gate | up]."""
    gate, up = x.chunk(2, dim=-1)
    return swiglu(gate, up)


def swiglu_backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """Closed-form (dgate, dup) of swiglu, fp32 math, one rounding each, as the C++ kernel computes
    them: with s = sigmoid(gate), dgate = dout * up * s * (1 + gate * (1 - s)), dup = dout * gate * s."""
    md = _math_dtype(gate)
    g, u, d = gate.to(md), up.to(md), dout.to(md)
    s = torch.sigmoid(g)
    ds = d * s
    return (ds * u * (1 + g * (1 - s))).to(gate.dtype), (ds * g).to(up.dtype)


def swiglu_packed_backward(dout: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The gradient of swiglu_packed: [dgate | dup] in x's layout."""
    gate, up = x.chunk(2, dim=-1)
    return torch.cat(swiglu_backward(dout, gate, up), dim=-1)


# ---- cross-entropy -----------------------------------------------------------------------------

def _reduce_loss(loss_rows: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """'none' keeps the rows; 'sum' adds them; 'mean' divides by the number of non-ignored rows,
    and gives 0 (not NaN, unlike F.cross_entropy) when every row is ignored."""
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1).to(total.dtype)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """Softmax cross-entropy of logits [..., V] against labels [...] in fp32 math (fp64 for fp64),
    rounded once to logits' dtype. Rows whose label is ignore_index count 0 and are left out of
    the mean's denominator."""
    md = _math_dtype(logits)
    x = logits.to(md).reshape(-1, logits.shape[-1])
    y = labels.reshape(-1)
    valid = y != ignore_index
    rows = F.cross_entropy(x, y, ignore_index=ignore_index, reduction="none")
    out = _reduce_loss(rows, valid, reduction)
    if reduction == "none":
        out = out.reshape(labels.shape)
    return out.to(logits.dtype)


def cross_entropy_backward(dloss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                           ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Closed-form d(loss)/d(logits) = (softmax(logits) - onehot(labels)) * scale, 0 on ignored
    rows; scale = dloss (per row for 'none'), divided by the number of valid rows for 'mean'."""
    md = _math_dtype(logits)
    V = logits.shape[-1]
    x = logits.to(md).reshape(-1, V)
    y = labels.reshape(-1)
    valid = y != ignore_index
    g = torch.softmax(x, dim=-1)
    g[valid, y[valid]] -= 1
    if reduction == "none":
        scale = dloss.to(md).reshape(-1, 1)
    else:
        scale = dloss.to(md).reshape(1, 1)
        if reduction == "mean":
            scale = scale / valid.sum().clamp(min=1).to(md)
    g = g * scale * valid.to(md).unsqueeze(1)
    return g.reshape(logits.shape).to(logits.dtype)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """cross_entropy(hidden [N, H] @ weight [V, H]^T, labels [N]); the projection in the inputs'
    dtype (as F.linear), the loss in fp32 math. Materialises all N x V logits: the oracle only."""
    return cross_entropy(hidden @ weight.t(), labels, ignore_index, reduction)


def linear_cross_entropy_backward(dloss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                                  labels: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"):
    """Closed-form (dhidden, dweight) of linear_cross_entropy: dlogits @ weight and dlogits^T @ hidden."""
    dlogits = cross_entropy_backward(dloss, hidden @ weight.t(), labels, ignore_index, reduction)
    return dlogits @ weight, dlogits.t() @ hidden
