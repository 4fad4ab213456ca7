"""mmfuse: portable, performance-first training suite for multimodal large models.

`mmfuse.ops` holds the fused operators (also reachable as `torch.ops.mmfuse.*`).
"""

__version__ = "0.1.0"

from mmfuse import ops  # noqa: E402,F401  (registers torch.ops.mmfuse.*)
