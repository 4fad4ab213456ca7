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


# ---- attention ---------------------------------------------------------------------------------

def attention_visible(lq: int, lk: int, causal: bool, window: tuple[int, int] | None,
                      device=None) -> torch.Tensor:
    """[lq, lk] bool: key j is visible to query i. Bottom-right aligned (flash-attn >= 2.1):
    with off = lk - lq, j >= i + off - left (left >= 0) and j <= i + off + right (right >= 0);
    causal sets right = 0."""
    left, right = window if window is not None else (-1, -1)
    if causal:
        right = 0
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    off = lk - lq
    vis = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if left >= 0:
        vis &= j >= i + off - left
    if right >= 0:
        vis &= j <= i + off + right
    return vis


def _attention_segments(cu_q: torch.Tensor | None, cu_k: torch.Tensor | None, tq: int, tk: int):
    if cu_q is None:
        return [(0, tq, 0, tk)]
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return [(cq[b], cq[b + 1], ck[b], ck[b + 1]) for b in range(len(cq) - 1)]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor | None = None,
              cu_seqlens_k: torch.Tensor | None = None, causal: bool = False, softmax_scale: float | None = None,
              window: tuple[int, int] | None = None):
    """(out [T, Hq, D], lse [Hq, T]) of packed-sequence attention: an explicit masked softmax per
    sequence in fp32 math (fp64 for fp64); GQA by repeating each kv head over its Hq/Hk query heads.
    A query that sees no key gets out = 0 and lse = -inf. Differentiable (ordinary autograd)."""
    md = _math_dtype(q)
    tq, hq, d = q.shape
    tk, hk, _ = k.shape
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    qm, km, vm = q.to(md), k.repeat_interleave(hq // hk, dim=1).to(md), v.repeat_interleave(hq // hk, dim=1).to(md)
    outs, lses = [], []
    for q0, q1, k0, k1 in _attention_segments(cu_seqlens_q, cu_seqlens_k, tq, tk):
        vis = attention_visible(q1 - q0, k1 - k0, causal, window, q.device)
        s = torch.einsum("ihd,jhd->hij", qm[q0:q1], km[k0:k1]) * scale
        s = s.masked_fill(~vis, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)                                        # [H, lq]
        p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0)[..., None])  # 0 where masked
        outs.append(torch.einsum("hij,jhd->ihd", p, vm[k0:k1]))
        lses.append(lse)
    out = torch.cat(outs, dim=0) if outs else qm.new_zeros(0, hq, d)
    lse = torch.cat(lses, dim=1) if lses else qm.new_zeros(hq, 0)
    return out.to(q.dtype), lse


def attention_backward(dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                       cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                       causal: bool = False, softmax_scale: float | None = None,
                       window: tuple[int, int] | None = None):
    """Closed-form (dq, dk, dv) of attention, as the C++ kernel computes them: P = exp(S - lse),
    Dv = rowsum(dO * O) - dlse, dS = P * (dO V^T - Dv), dq = scale dS K, dk = scale dS^T Q, dv = P^T dO
    (dk, dv summed over the query heads of each kv head)."""
    md = _math_dtype(q)
    tq, hq, d = q.shape
    tk, hk, _ = k.shape
    g = hq // hk
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    qm, km, vm = q.to(md), k.repeat_interleave(g, dim=1).to(md), v.repeat_interleave(g, dim=1).to(md)
    do, om = dout.to(md), out.to(md)
    dv_row = (do * om).sum(-1).t()                                              # [H, T]
    if dlse is not None:
        dv_row = dv_row - dlse.to(md)
    dq, dk, dv = torch.zeros_like(qm), torch.zeros_like(km), torch.zeros_like(vm)
    for q0, q1, k0, k1 in _attention_segments(cu_seqlens_q, cu_seqlens_k, tq, tk):
        vis = attention_visible(q1 - q0, k1 - k0, causal, window, q.device)
        s = torch.einsum("ihd,jhd->hij", qm[q0:q1], km[k0:k1]) * scale
        l = lse[:, q0:q1].to(md)
        p = torch.exp(s - l.masked_fill(l == float("-inf"), 0)[..., None]).masked_fill(~vis, 0)
        dv[k0:k1] = torch.einsum("hij,ihd->jhd", p, do[q0:q1])
        dp = torch.einsum("ihd,jhd->hij", do[q0:q1], vm[k0:k1])
        ds = p * (dp - dv_row[:, q0:q1, None])
        dq[q0:q1] = torch.einsum("hij,jhd->ihd", ds, km[k0:k1]) * scale
        dk[k0:k1] = torch.einsum("hij,ihd->jhd", ds, qm[q0:q1]) * scale
    dk = dk.view(tk, hk, g, d).sum(2)
    dv = dv.view(tk, hk, g, d).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def attention_merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """Exact combination of two partial attentions over disjoint key sets (out [T, H, D], lse [H, T]):
    lse = logaddexp(lse_a, lse_b), out = out_a e^(lse_a - lse) + out_b e^(lse_b - lse); a side with
    lse = -inf contributes nothing, and both -inf give out = 0, lse = -inf."""
    md = torch.float64 if out_a.dtype == torch.float64 else torch.float32
    la, lb = lse_a.to(md), lse_b.to(md)
    lse = torch.logaddexp(la, lb)
    safe = lse.masked_fill(lse == float("-inf"), 0)
    wa = torch.exp(la - safe).t()[..., None]
    wb = torch.exp(lb - safe).t()[..., None]
    out = out_a.to(md) * wa + out_b.to(md) * wb
    return out.to(out_a.dtype), lse
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
