"""Triton kernels of the mmfuse ops, one module per op (`rms_norm`, `swiglu`, `rotary`, `mrope`,
`attention`, `cross_entropy`), each with its `_<op>_fwd_kernel` / `_<op>_bwd_kernel` and the host
launchers the op layer calls; `linear_cross_entropy` is host code only (cuBLAS GEMMs around the
cross-entropy kernel).

Portability rules every kernel here follows (the Triton 3.2 language, which triton-ascend supports):
no float64 inside a kernel (float64 ops run the reference instead, see `mmfuse.ops._backend`), no
autotuning (block sizes come from a heuristic on the problem size), grids of at most 65535
programs per axis (programs loop over row tiles instead), per-program tiles of at most 8192
elements (one exception: attention's CUDA tiles of 128 rows x D <= 128, for tensor-core use),
reductions across programs through per-program partial results summed afterwards (no
atomics, so results are deterministic), and int64 address arithmetic wherever an offset can pass 2^31.

Row and token counts change with every packed batch, so kernels do not specialize on them
(`do_not_specialize`; Triton would otherwise compile a variant per divisibility class of each integer
argument): one compiled kernel per dtype and layout. Hidden sizes and strides stay specialized, since
their divisibility by 16 is what lets loads and stores vectorize.

On CPU tensors the kernels run only in Triton's interpreter, which is chosen when triton is first
imported (TRITON_INTERPRET=1 in the environment at that moment): triton.language's own helpers
(tl.sum, tl.cdiv, ...) are decorated then, and an interpreted kernel cannot call compiled ones.
"""

from __future__ import annotations


def interpreted() -> bool:
    """Whether triton was imported in interpreter mode (kernels then run on CPU tensors, slowly)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)
