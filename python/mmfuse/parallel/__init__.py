"""Parallel training on torch.distributed: layout and groups (state), autograd collectives, tensor
and sequence parallel layers, pipeline schedules, context parallel attention, data parallel with
bucketed overlapped reduction and ZeRO-1. Models stay plain; a per-model plan applies these."""

from mmfuse.parallel.layout import ParallelLayout
from mmfuse.parallel.state import ParallelState, init_parallel

__all__ = ["ParallelLayout", "ParallelState", "init_parallel"]
