"""Fused operators. Each is a `torch.library.custom_op` in namespace `mmfuse` (so also
`torch.ops.mmfuse.<name>`), works in eager mode and under `torch.compile`, and dispatches on the
tensors' device (see `mmfuse.ops._backend`). `mmfuse.ops.reference` holds the exact contracts.
In plain eager mode the functions here call the ops' implementations around the dispatcher, with
bitwise the same results (`mmfuse.ops._eager`)."""

from mmfuse.ops import reference
from mmfuse.ops.attention import attention, attention_merge
from mmfuse.ops.cross_entropy import cross_entropy
from mmfuse.ops.linear_cross_entropy import linear_cross_entropy
from mmfuse.ops.rms_norm import add_rms_norm, rms_norm
from mmfuse.ops.rotary import apply_mrope, mrope_cos_sin, rotary, vision_rope_cos_sin
from mmfuse.ops.swiglu import swiglu, swiglu_packed

__all__ = [
    "reference", "rms_norm", "add_rms_norm", "rotary", "apply_mrope", "mrope_cos_sin", "vision_rope_cos_sin",
    "swiglu", "swiglu_packed", "attention", "attention_merge", "cross_entropy", "linear_cross_entropy",
]
