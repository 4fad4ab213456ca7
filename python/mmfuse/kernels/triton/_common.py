"""Launch heuristics and argument preparation shared by the Triton launchers, and `to_dtype`, the
rounding helper every kernel stores through."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmfuse.kernels.triton import interpreted

# Programs per grid axis: CUDA's limit for grid axes 1 and 2, kept on axis 0 too so that one launch
# shape suits every Triton backend (the portability rule for triton-ascend); kernels loop over the
# tiles a larger problem has beyond it.
MAX_GRID = 65535
# Elements of one program's tile (per tensor): 8192 fp32 values are 32 KiB, so a kernel's few
# tiles stay within an Ascend AI core's unified buffer (192 KiB) and a GPU program's registers.
MAX_TILE = 8192


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def num_warps(tile: int) -> int:
    """Warps for a tile of `tile` elements: enough threads for ~8 elements each, as Liger-Kernel's
    calculate_settings (4 / 8 / 16 warps at 2048 / 8192 / 32768 elements)."""
    if tile >= 8192:
        return 16
    if tile >= 2048:
        return 8
    return 4


def grid(tiles: int) -> int:
    """Programs for `tiles` independent tiles: one each, up to MAX_GRID (then each loops)."""
    return max(1, min(int(tiles), MAX_GRID))


def reduction_programs(tiles: int, device: torch.device) -> int:
    """Programs for a kernel whose programs each write one partial result that is summed afterwards:
    a few per streaming multiprocessor keep every SM busy while the partials stay small
    (4 x 132 SMs x 2048 fp32 = 4.3 MiB at hidden 2048 on an H100)."""
    if device.type == "cuda":
        per_device = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        per_device = 64
    return max(1, min(int(tiles), per_device, MAX_GRID))


def rows_2d(t: torch.Tensor, cols: int) -> torch.Tensor:
    """t as [rows, cols] with unit column stride (a row stride is passed to the kernel): a view
    when one exists (contiguous tensors, slices of the last dim, halves of a packed tensor), else a
    contiguous copy."""
    try:
        v = t.view(-1, cols)
    except RuntimeError:  # leading dims that do not collapse into one row stride
        v = None
    if v is None or (v.stride(1) != 1 and cols > 1):
        v = t.contiguous().view(-1, cols)
    return v


# Triton's interpreter converts fp32 to bf16 by truncating the mantissa (triton 3.9: `cast_impl`
# passes no rounding mode), while compiled kernels round to nearest even as PyTorch does. Under the
# interpreter `to_dtype` rounds by hand, so CPU tests check the rounding the GPU performs.
_EMULATE_BF16_ROUNDING = tl.constexpr(interpreted())


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """fp32 x rounded to nearest even in `dtype` (every store of a narrower result goes through here)."""
    if _EMULATE_BF16_ROUNDING:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            return tl.where(x == x, rounded, x.to(tl.bfloat16))  # NaN keeps NaN
        else:
            return x.to(dtype)
    else:
        return x.to(dtype)


# Triton's interpreter (triton 3.9) multiplies the raw uint16 storage of bf16 operands in tl.dot
# (`create_dot` hands numpy the bit patterns): garbage. Under the interpreter `dot` widens bf16
# operands to fp32 first, which is exact, as are the products a GPU's bf16 MMA forms.
_WIDEN_BF16_DOT = tl.constexpr(interpreted())


@triton.jit
def dot(a, b, PRECISION: tl.constexpr):
    """tl.dot(a, b) accumulated in fp32 (PRECISION: "ieee" for exact fp32 products, "tf32" otherwise)."""
    if _WIDEN_BF16_DOT:
        if a.dtype == tl.bfloat16:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a, b, input_precision=PRECISION)
    else:
        return tl.dot(a, b, input_precision=PRECISION)
