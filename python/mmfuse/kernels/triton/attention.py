"""Varlen attention in Triton, FlashAttention-2 style (the contract: `mmfuse.ops.reference.attention`
and `attention_backward`).

Forward: a program owns BLOCK_M queries of one sequence and one query head and loops over the K/V
tiles of the same sequence with an online softmax in fp32 (base-2 exponentials, the scale folded
into log2 e), writing out (rounded once) and lse (natural log, fp32). Tiles that the causal mask
(bottom-right aligned: query i of lq sees key j <= i + lk - lq) or the window hide completely are
never visited: the loop runs over the key range [lo, hi) that the tile's first and last query can
see; elements are masked only inside that range. GQA: kv head = q head // (Hq / Hk).

Backward, from q, k, v, out, lse (P = exp(S - lse) recomputed tile by tile, never stored):
  preprocess  delta = rowsum(dO * O) - dlse                 per (token tile, q head)
  dK/dV       per (key tile, kv head): loops over the Hq/Hk query heads of its group and over the
              query tiles that see the key tile, so dK and dV are reduced in registers (no atomics)
  dQ          per (query tile, q head): loops over the key tiles it sees (no atomics)
Both give deterministic results. dS = P * (dP - delta), as in the reference (dlse enters through delta).

Matmuls accumulate in fp32; fp32 inputs use IEEE fp32 dots (no TF32: it would miss the 1e-5
contract). With bf16/fp16 inputs P is rounded to the input dtype before P·V and Pᵀ·dO, as
FlashAttention does, but dS is split into two values of the input dtype, hi = round(dS) and
lo = round(dS - hi), each multiplied (two MMAs for dS·K and dSᵀ·Q: 9 per tile pair in the backward
instead of 7). Measured in the interpreter (bf16/fp16, 36 seeded cases of the precision test):
rounding dS once gives dq and dk errors up to 2.2x those of the eager computation against float64,
outside DESIGN.md's 2x rule; the split brings the worst to 1.8x (out 1.5x, dv 1.5x with P rounded).

Grids are (tiles, sequences, heads), each axis at most 65535 programs (programs loop over the tiles
and sequences past that). The head dim is padded
to a power of two (at least 16, tl.dot's minimum) with masked loads, so any D <= 256 works.

Shape legend: T tokens (packed), Hq / Hk query / kv heads, D head dim; lq / lk one sequence's query /
key count; off = lk - lq (the bottom-right alignment); `left` / `right` the window (-1: unbounded;
causal sets right = 0).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mmfuse.kernels.triton._common import MAX_TILE, dot, grid, next_pow2, to_dtype

_LOG2E = math.log2(math.e)


@triton.jit
def _visible(offs_m, offs_n, off, left, right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """[M, N] (or broadcastable) bool: key offs_n visible to query offs_m (positions in the sequence)."""
    vis = offs_n >= 0
    if HAS_RIGHT:
        vis = vis & (offs_n <= offs_m + (off + right))
    if HAS_LEFT:
        vis = vis & (offs_n >= offs_m + (off - left))
    return vis


@triton.jit
def _key_range(m0, m_last, lk, off, left, right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """[lo, hi) of the keys that queries m0..m_last may see; lo a multiple of BLOCK_N."""
    lo = m0 * 0
    hi = lk + m0 * 0
    if HAS_LEFT:
        lo = tl.maximum(m0 + off - left, 0) // BLOCK_N * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(hi, m_last + off + right + 1)
    return lo, hi


@triton.jit
def _query_range(n0, n_last, lq, off, left, right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """[lo, hi) of the queries that may see keys n0..n_last; lo a multiple of BLOCK_M."""
    lo = n0 * 0
    hi = lq + n0 * 0
    if HAS_RIGHT:
        lo = tl.maximum(n0 - off - right, 0) // BLOCK_M * BLOCK_M
    if HAS_LEFT:
        hi = tl.minimum(hi, n_last - off + left + 1)
    return lo, hi


@triton.jit
def _dot_rounded(x, b, dt: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """dot(x, b) for fp32 x and b in dt: x rounded to dt, or with SPLIT as hi + lo, two dt values."""
    hi = to_dtype(x, dt)
    acc = dot(hi, b, PRECISION)
    if SPLIT:
        acc += dot(to_dtype(x - hi.to(tl.float32), dt), b, PRECISION)
    return acc


@triton.jit(do_not_specialize=["n_seqs", "left", "right"])
def _attention_fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K, n_seqs, D, GROUP, qk_scale, left, right,
                          stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                          stride_ot, stride_oh, stride_lh,
                          HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    hq = tl.program_id(2).to(tl.int64)
    hk = hq // GROUP
    dt = V.dtype.element_ty
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    for seq in range(tl.program_id(1), n_seqs, tl.num_programs(1)):
        q_start = tl.load(CU_Q + seq)
        lq = tl.load(CU_Q + seq + 1) - q_start
        k_start = tl.load(CU_K + seq)
        lk = tl.load(CU_K + seq + 1) - k_start
        off = lk - lq
        n_m_tiles = tl.cdiv(lq, BLOCK_M)
        for it in range(tl.program_id(0), n_m_tiles, tl.num_programs(0)):
            # Last tiles first: under a causal mask they see the most keys, so the long programs
            # start first and the short ones fill the tail (as FlashAttention-2 orders its blocks).
            m0 = (n_m_tiles - 1 - it) * BLOCK_M
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_mask = offs_m < lq
            rows_q = (q_start + offs_m).to(tl.int64)
            q = tl.load(Q + rows_q[:, None] * stride_qt + hq * stride_qh + offs_d[None, :],
                        mask=m_mask[:, None] & d_mask[None, :], other=0.0)
            acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            lo, hi = _key_range(m0, tl.minimum(m0 + BLOCK_M, lq) - 1, lk, off, left, right,
                                HAS_LEFT, HAS_RIGHT, BLOCK_N)
            for n0 in range(lo, hi, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                n_mask = offs_n < lk
                rows_k = (k_start + offs_n).to(tl.int64)
                kv_mask = n_mask[:, None] & d_mask[None, :]
                k = tl.load(K + rows_k[:, None] * stride_kt + hk * stride_kh + offs_d[None, :],
                            mask=kv_mask, other=0.0)
                v = tl.load(V + rows_k[:, None] * stride_vt + hk * stride_vh + offs_d[None, :],
                            mask=kv_mask, other=0.0)
                s = dot(q, tl.trans(k), PRECISION) * qk_scale          # log2 units
                vis = n_mask[None, :] & _visible(offs_m[:, None], offs_n[None, :], off, left, right,
                                                 HAS_LEFT, HAS_RIGHT)
                s = tl.where(vis, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                # Rows that have seen no key yet keep m = -inf; subtracting 0 instead keeps p = 0, not NaN.
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + dot(to_dtype(p, dt), v, PRECISION)
                m_i = m_new
            # A query that sees no key: out 0, lse -inf.
            seen = l_i > 0.0
            l_safe = tl.where(seen, l_i, 1.0)
            out = acc / l_safe[:, None]
            lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
            tl.store(O + rows_q[:, None] * stride_ot + hq * stride_oh + offs_d[None, :],
                     to_dtype(out, O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
            tl.store(LSE + hq * stride_lh + rows_q, lse, mask=m_mask)


@triton.jit(do_not_specialize=["T"])
def _attention_bwd_preprocess_kernel(O, DO, DLSE, DELTA, T, D, stride_ot, stride_oh, stride_dot, stride_doh,
                                     stride_lh, HAS_DLSE: tl.constexpr, BLOCK_T: tl.constexpr,
                                     BLOCK_D: tl.constexpr):
    """delta[h, t] = rowsum(dO * O) - dlse[h, t] in fp32."""
    h = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    for tile in range(tl.program_id(0), tl.cdiv(T, BLOCK_T), tl.num_programs(0)):
        rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask = rows < T
        rows64 = rows.to(tl.int64)
        mask = t_mask[:, None] & d_mask[None, :]
        o = tl.load(O + rows64[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(DO + rows64[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        if HAS_DLSE:
            delta -= tl.load(DLSE + h * stride_lh + rows64, mask=t_mask, other=0.0)
        tl.store(DELTA + h * stride_lh + rows64, delta, mask=t_mask)


@triton.jit
def _lse_log2(LSE, offs, mask):
    """lse in log2 units, +inf for padding rows and for rows that see no key (their P is then 0)."""
    lse = tl.load(LSE + offs, mask=mask, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    return lse * 1.4426950408889634


@triton.jit(do_not_specialize=["n_seqs", "left", "right"])
def _attention_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, n_seqs, D, GROUP, qk_scale, scale,
                               left, right, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                               stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
                               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr,
                               SPLIT_DS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_D: tl.constexpr):
    """dK, dV of one key tile and kv head, summed over the GROUP query heads that share the kv head.
    Works on transposed tiles ([keys, queries]) so no [M, N] result needs transposing."""
    hk = tl.program_id(2).to(tl.int64)
    dt = K.dtype.element_ty
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    for seq in range(tl.program_id(1), n_seqs, tl.num_programs(1)):
        q_start = tl.load(CU_Q + seq)
        lq = tl.load(CU_Q + seq + 1) - q_start
        k_start = tl.load(CU_K + seq)
        lk = tl.load(CU_K + seq + 1) - k_start
        off = lk - lq
        for n_tile in range(tl.program_id(0), tl.cdiv(lk, BLOCK_N), tl.num_programs(0)):
            n0 = n_tile * BLOCK_N
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < lk
            rows_k = (k_start + offs_n).to(tl.int64)
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(K + rows_k[:, None] * stride_kt + hk * stride_kh + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            v = tl.load(V + rows_k[:, None] * stride_vt + hk * stride_vh + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            lo, hi = _query_range(n0, tl.minimum(n0 + BLOCK_N, lk) - 1, lq, off, left, right,
                                  HAS_LEFT, HAS_RIGHT, BLOCK_M)
            for g in range(0, GROUP):
                hq = hk * GROUP + g
                for m0 in range(lo, hi, BLOCK_M):
                    offs_m = m0 + tl.arange(0, BLOCK_M)
                    m_mask = offs_m < lq
                    rows_q = (q_start + offs_m).to(tl.int64)
                    q_mask = m_mask[:, None] & d_mask[None, :]
                    q = tl.load(Q + rows_q[:, None] * stride_qt + hq * stride_qh + offs_d[None, :],
                                mask=q_mask, other=0.0)
                    do = tl.load(DO + rows_q[:, None] * stride_dot + hq * stride_doh + offs_d[None, :],
                                 mask=q_mask, other=0.0)
                    lse2 = _lse_log2(LSE, hq * stride_lh + rows_q, m_mask)
                    delta = tl.load(DELTA + hq * stride_lh + rows_q, mask=m_mask, other=0.0)
                    s_T = dot(k, tl.trans(q), PRECISION) * qk_scale       # [N, M], log2 units
                    vis_T = m_mask[None, :] & _visible(offs_m[None, :], offs_n[:, None], off, left, right,
                                                       HAS_LEFT, HAS_RIGHT)
                    p_T = tl.exp2(tl.where(vis_T, s_T, float("-inf")) - lse2[None, :])
                    dv += dot(to_dtype(p_T, dt), do, PRECISION)
                    dp_T = dot(v, tl.trans(do), PRECISION)
                    ds_T = p_T * (dp_T - delta[None, :])
                    dk += _dot_rounded(ds_T, q, dt, SPLIT_DS, PRECISION)
            tl.store(DK + rows_k[:, None] * stride_dkt + hk * stride_dkh + offs_d[None, :],
                     to_dtype(dk * scale, DK.dtype.element_ty), mask=kv_mask)
            tl.store(DV + rows_k[:, None] * stride_dvt + hk * stride_dvh + offs_d[None, :],
                     to_dtype(dv, DV.dtype.element_ty), mask=kv_mask)


@triton.jit(do_not_specialize=["n_seqs", "left", "right"])
def _attention_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, n_seqs, D, GROUP, qk_scale, scale,
                             left, right, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                             stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lh,
                             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr,
                             SPLIT_DS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr):
    """dQ of one query tile and query head, over the key tiles it sees."""
    hq = tl.program_id(2)
    hk = (hq // GROUP).to(tl.int64)
    hq = hq.to(tl.int64)
    dt = K.dtype.element_ty
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    for seq in range(tl.program_id(1), n_seqs, tl.num_programs(1)):
        q_start = tl.load(CU_Q + seq)
        lq = tl.load(CU_Q + seq + 1) - q_start
        k_start = tl.load(CU_K + seq)
        lk = tl.load(CU_K + seq + 1) - k_start
        off = lk - lq
        n_m_tiles = tl.cdiv(lq, BLOCK_M)
        for it in range(tl.program_id(0), n_m_tiles, tl.num_programs(0)):
            m0 = (n_m_tiles - 1 - it) * BLOCK_M  # last tiles first, as in the forward
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_mask = offs_m < lq
            rows_q = (q_start + offs_m).to(tl.int64)
            q_mask = m_mask[:, None] & d_mask[None, :]
            q = tl.load(Q + rows_q[:, None] * stride_qt + hq * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(DO + rows_q[:, None] * stride_dot + hq * stride_doh + offs_d[None, :], mask=q_mask,
                         other=0.0)
            lse2 = _lse_log2(LSE, hq * stride_lh + rows_q, m_mask)
            delta = tl.load(DELTA + hq * stride_lh + rows_q, mask=m_mask, other=0.0)
            dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            lo, hi = _key_range(m0, tl.minimum(m0 + BLOCK_M, lq) - 1, lk, off, left, right,
                                HAS_LEFT, HAS_RIGHT, BLOCK_N)
            for n0 in range(lo, hi, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                n_mask = offs_n < lk
                rows_k = (k_start + offs_n).to(tl.int64)
                kv_mask = n_mask[:, None] & d_mask[None, :]
                k = tl.load(K + rows_k[:, None] * stride_kt + hk * stride_kh + offs_d[None, :], mask=kv_mask,
                            other=0.0)
                v = tl.load(V + rows_k[:, None] * stride_vt + hk * stride_vh + offs_d[None, :], mask=kv_mask,
                            other=0.0)
                s = dot(q, tl.trans(k), PRECISION) * qk_scale
                vis = n_mask[None, :] & _visible(offs_m[:, None], offs_n[None, :], off, left, right,
                                                 HAS_LEFT, HAS_RIGHT)
                p = tl.exp2(tl.where(vis, s, float("-inf")) - lse2[:, None])
                dp = dot(do, tl.trans(v), PRECISION)
                ds = p * (dp - delta[:, None])
                dq += _dot_rounded(ds, k, dt, SPLIT_DS, PRECISION)
            tl.store(DQ + rows_q[:, None] * stride_dqt + hq * stride_dqh + offs_d[None, :],
                     to_dtype(dq * scale, DQ.dtype.element_ty), mask=q_mask)


# ---- host launchers ----------------------------------------------------------------------------

def _blocks(D: int, dtype: torch.dtype, device: torch.device, backward: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages): M rows of the resident tile (queries in the
    forward and dQ kernels; the dK/dV kernel holds BLOCK_M keys and steps BLOCK_N queries at a time).

    Per-program tiles stay within MAX_TILE (8192) elements (64 x 128 at D <= 128, 32 x 256 at D = 256):
    the portable bound (an Ascend AI core's unified buffer, see _common). On CUDA with bf16/fp16 the
    resident tile is 128 rows at D <= 128 (the Triton tutorial's H100 tiles: forward 128 x 64,
    backward 128 x 32; a 128 x 128 fp32 accumulator over 8 warps is 64 registers a thread). fp32
    inputs keep the portable tiles: the larger ones need up to 224 KiB of shared memory (sm_90 has
    227, sm_80 163; compiled sizes, tests/ops/compile_triton.py). Not tuned on a GPU yet.
    """
    block_d = max(16, next_pow2(D))
    if device.type == "cuda" and dtype != torch.float32:
        if backward:
            return (128, 32, block_d, 8, 2) if block_d <= 128 else (64, 32, block_d, 8, 1)
        if block_d <= 128:
            return 128, 64, block_d, 8, 3
    side = max(16, min(64, MAX_TILE // block_d))
    return side, side, block_d, 4 if block_d <= 64 else 8, 2


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _seqlens(cu_q, cu_k, tq: int, tk: int, device):
    if cu_q is None:
        cu_q = torch.tensor([0, tq], dtype=torch.int32, device=device)
        cu_k = torch.tensor([0, tk], dtype=torch.int32, device=device)
    return cu_q.contiguous(), cu_k.contiguous()


def _max_len(cu: torch.Tensor, given: int | None) -> int:
    if given is not None and given >= 0:
        return int(given)
    return int((cu[1:] - cu[:-1]).max().item()) if cu.numel() > 1 else 0


def _mask_args(causal: bool, window_left: int, window_right: int) -> tuple[int, int, bool, bool]:
    """(left, right, HAS_LEFT, HAS_RIGHT): causal is the right bound 0 (it overrides window_right)."""
    right = 0 if causal else window_right
    return window_left, right, window_left >= 0, right >= 0


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get fp32 products (TF32 would miss the 1e-5 contract); "tf32" is ignored for bf16/fp16.
    return "ieee" if dtype == torch.float32 else "tf32"


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
            cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int | None, causal: bool, softmax_scale: float,
            window_left: int = -1, window_right: int = -1):
    """(out [T, Hq, D] in q's dtype, lse [Hq, T] fp32) of packed attention; cu_seqlens None: one sequence."""
    tq, hq, D = q.shape
    tk, hk, _ = k.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(hq, tq, dtype=torch.float32, device=q.device)
    if tq == 0:
        return out, lse
    if tk == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    cu_q, cu_k = _seqlens(cu_seqlens_q, cu_seqlens_k, tq, tk, q.device)
    n_seqs = cu_q.shape[0] - 1
    max_q = _max_len(cu_q, max_seqlen_q)
    left, right, has_left, has_right = _mask_args(causal, window_left, window_right)
    block_m, block_n, block_d, warps, stages = _blocks(D, q.dtype, q.device, backward=False)
    launch = (grid(triton.cdiv(max_q, block_m)), grid(n_seqs), hq)
    _attention_fwd_kernel[launch](
        q, k, v, out, lse, cu_q, cu_k, n_seqs, D, hq // hk, softmax_scale * _LOG2E, left, right,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        HAS_LEFT=has_left, HAS_RIGHT=has_right, PRECISION=_precision(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=stages)
    return out, lse


def backward(dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
             cu_seqlens_k: torch.Tensor | None, causal: bool, softmax_scale: float, window_left: int = -1,
             window_right: int = -1, max_seqlen_q: int | None = None, max_seqlen_k: int | None = None):
    """(dq, dk, dv) of attention, dlse (the gradient reaching lse, [Hq, T]) included when given.
    Without max_seqlen_q/k they are read from cu_seqlens (one device-to-host copy)."""
    tq, hq, D = q.shape
    tk, hk, _ = k.shape
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if tq == 0 or tk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    q, k, v, out = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(out)
    dout = _unit_last(dout.to(q.dtype))
    lse = lse.to(torch.float32).contiguous()
    dlse = dlse.to(torch.float32).contiguous() if dlse is not None else None
    cu_q, cu_k = _seqlens(cu_seqlens_q, cu_seqlens_k, tq, tk, q.device)
    n_seqs = cu_q.shape[0] - 1
    max_q, max_k = _max_len(cu_q, max_seqlen_q), _max_len(cu_k, max_seqlen_k)
    left, right, has_left, has_right = _mask_args(causal, window_left, window_right)
    block_m, block_n, block_d, warps, stages = _blocks(D, q.dtype, q.device, backward=True)

    delta = torch.empty(hq, tq, dtype=torch.float32, device=q.device)
    block_t = max(16, min(128, MAX_TILE // block_d))
    _attention_bwd_preprocess_kernel[(grid(triton.cdiv(tq, block_t)), hq)](
        out, dout, dlse if dlse is not None else lse, delta, tq, D, out.stride(0), out.stride(1),
        dout.stride(0), dout.stride(1), delta.stride(0), HAS_DLSE=dlse is not None,
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)

    common = dict(HAS_LEFT=has_left, HAS_RIGHT=has_right, PRECISION=_precision(q.dtype),
                  SPLIT_DS=q.dtype != torch.float32, BLOCK_D=block_d,
                  num_warps=warps, num_stages=stages)
    group = hq // hk
    # dK/dV: block_m keys per program (its BLOCK_N), block_n queries per step (its BLOCK_M).
    _attention_bwd_dkdv_kernel[(grid(triton.cdiv(max_k, block_m)), grid(n_seqs), hk)](
        q, k, v, dout, lse, delta, dk, dv, cu_q, cu_k, n_seqs, D, group, softmax_scale * _LOG2E,
        softmax_scale, left, right, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        lse.stride(0), BLOCK_M=block_n, BLOCK_N=block_m, **common)
    _attention_bwd_dq_kernel[(grid(triton.cdiv(max_q, block_m)), grid(n_seqs), hq)](
        q, k, v, dout, lse, delta, dq, cu_q, cu_k, n_seqs, D, group, softmax_scale * _LOG2E, softmax_scale,
        left, right, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, **common)
    return dq, dk, dv
