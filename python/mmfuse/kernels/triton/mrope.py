"""Text M-RoPE with the angles computed in the kernel, q and k in one launch (the contract:
`mmfuse.ops.reference.apply_mrope`, i.e. `rotary` with the tables of `reference.mrope_cos_sin`).

Frequency j of token t uses position stream 0, 1 or 2 (t, h, w) by the mrope_section it falls in;
its angle is float32(position_ids[stream, t]) * inv_freq[j] (one fp32 multiply, as HF) and its
cos/sin come from `_sincos` below, once per (token, frequency), shared by all q and k heads. The
[T, D] cos/sin tables are never written. The pairing is rotate-half over the whole head dim. The
backward is the same kernel with INVERSE (the rotation by the negative angle).

Shape legend: T tokens, Hq / Hk heads of q / k, D head dim, R = D/2 frequencies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmfuse.kernels.triton._common import grid, next_pow2, num_warps
from mmfuse.kernels.triton.rotary import _rotate_heads, head_block


@triton.jit
def _sincos(x):
    """(cos x, sin x) of fp32 angles without float64 or the hardware's approximate sin/cos (whose
    error grows with |x|; positions reach 10^5 here).

    x = k pi/2 + r, |r| <= ~pi/4: pi/2 = P1 + P2 + P3 (fp32 values of 24, 24 and 24 further bits).
    With a fused multiply-add, x - k P1 is exact for any integer k < 2^24 (the exact difference is
    a multiple of ulp(P1) and of ulp(x) below pi/4 in magnitude, so it fits 24 bits); the P2 and P3
    steps round once each, 2^-25 at most. sin r and cos r are the minimax polynomials of Cephes'
    sinf/cosf on [-pi/4, pi/4]; the quadrant k mod 4 swaps and negates them. Infinite and NaN angles
    give NaN.
    """
    k = tl.floor(x * 0.6366197723675814 + 0.5)
    r = tl.fma(k, -1.5707963705062866, x)
    r = tl.fma(k, 4.371138828673793e-08, r)
    r = tl.fma(k, 1.7151245100058819e-15, r)
    z = r * r
    sin_r = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * r + r
    cos_r = ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z - 0.5 * z + 1.0
    q = k - 4.0 * tl.floor(k * 0.25)            # k mod 4, exact in fp32 for |k| < 2^24
    odd = (q == 1.0) | (q == 3.0)
    sin_x = tl.where(odd, cos_r, sin_r)
    cos_x = tl.where(odd, sin_r, cos_r)
    sin_x = tl.where(q >= 2.0, -sin_x, sin_x)
    cos_x = tl.where((q == 1.0) | (q == 2.0), -cos_x, cos_x)
    return cos_x, sin_x


@triton.jit(do_not_specialize=["n"])
def _sincos_kernel(X, COS, SIN, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    c, s = _sincos(tl.load(X + offs, mask=mask, other=0.0))
    tl.store(COS + offs, c, mask=mask)
    tl.store(SIN + offs, s, mask=mask)


@triton.jit(do_not_specialize=["T"])
def _mrope_fwd_kernel(Q, K, QO, KO, POS, INV_FREQ, T, HQ, HK, R, SEC_T, SEC_TH,
                      stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
                      stride_qot, stride_qoh, stride_kot, stride_koh, stride_ps, stride_pt,
                      INVERSE: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                      BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    j = tl.arange(0, BLOCK_R)
    r_mask = j < R
    stream = (j >= SEC_T).to(tl.int64) + (j >= SEC_TH).to(tl.int64)
    inv_freq = tl.load(INV_FREQ + j, mask=r_mask, other=0.0)
    for t in range(pid, T, nprog):
        t64 = tl.cast(t, tl.int64)
        pos = tl.load(POS + stream * stride_ps + t64 * stride_pt, mask=r_mask, other=0)
        c, s = _sincos(pos.to(tl.float32) * inv_freq)
        if INVERSE:
            s = -s
        _rotate_heads(Q + t64 * stride_qt, QO + t64 * stride_qot, HQ, R, stride_qh, stride_qd, stride_qoh,
                      c, s, r_mask, False, BLOCK_HQ, BLOCK_R)
        _rotate_heads(K + t64 * stride_kt, KO + t64 * stride_kot, HK, R, stride_kh, stride_kd, stride_koh,
                      c, s, r_mask, False, BLOCK_HK, BLOCK_R)


def cos_sin(angles: torch.Tensor):
    """(cos, sin) of fp32 angles by the kernels' `_sincos` (its accuracy is tested through this)."""
    x = angles.to(torch.float32).contiguous().view(-1)
    cos, sin = torch.empty_like(x), torch.empty_like(x)
    if x.numel():
        block = 8192
        _sincos_kernel[(triton.cdiv(x.numel(), block),)](x, cos, sin, x.numel(), BLOCK=block, num_warps=8)
    return cos.view(angles.shape), sin.view(angles.shape)


def apply_mrope(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
                mrope_section, inverse: bool):
    """(q_out, k_out) for q [T, Hq, D], k [T, Hk, D], position_ids [3, T] (int32 or int64)."""
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    T, HQ, D = q.shape
    HK = k.shape[1]
    if T == 0 or D == 0:
        return q_out, k_out
    R = D // 2
    inv = inv_freq.to(torch.float32).contiguous()
    sec_t, sec_h = int(mrope_section[0]), int(mrope_section[1])
    block_r = next_pow2(R)
    block_hq, block_hk = head_block(HQ, block_r), head_block(HK, block_r)
    _mrope_fwd_kernel[(grid(T),)](
        q, k, q_out, k_out, position_ids, inv, T, HQ, HK, R, sec_t, sec_t + sec_h,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        position_ids.stride(0), position_ids.stride(1),
        INVERSE=inverse, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_R=block_r,
        num_warps=num_warps(max(block_hq, block_hk) * block_r))
    return q_out, k_out
