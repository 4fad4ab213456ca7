"""LoRA adapters on tensor-parallel linears (LoRALinear of models/common/lora.py, split as its base):

  column  y_TO/tp = x_TD @ W_r^T + s · (x_TD @ A^T) @ B_r^T     A [R, D] replicated, B [O, R] split by rows
  row     y_TD    = sum_r (x_TI/tp @ W_r^T + s · (x_TI/tp @ A_r^T) @ B^T)
                                                              A [R, I] split by columns, B [O, R] replicated

The row-parallel update joins the base's partial product before the one reduction (linearity), so
it costs no collective of its own. In each case the replicated factor's gradient is a partial sum per
rank (column: each rank back-propagates only its output rows into A; row: each rank's B sees only
its input columns), so it is marked `sequence_parallel` and all-reduced over TP with the other
partial gradients (tensor_parallel.sync_sequence_parallel_grads). Parameter names stay those of the
one-process model (`…q_proj.lora_A`), so checkpoints and adapter files are the same.
Legend: T tokens, D input width, O output width, I row-parallel input width, R LoRA rank, s scaling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfuse.models.common.lora import LoRALinear
from mmfuse.parallel.collectives import (copy_to_group, gather_sequence, group_rank, group_size,
                                         reduce_from_group, reduce_scatter_sequence)
from mmfuse.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear, TPShard, _param
from mmfuse.parallel.tp_overlap import gather_linear, linear_reduce_scatter


def _partial_grad(p: torch.nn.Parameter) -> torch.nn.Parameter:
    p.sequence_parallel = True
    return p


class ColumnParallelLoRALinear(ColumnParallelLinear):
    """ColumnParallelLinear plus a low-rank update; B holds this rank's output rows."""

    def __init__(self, base: ColumnParallelLinear, lora: LoRALinear, partition: int):
        super().__init__(base.weight, base.bias, base.group, base.sequence_parallel, base.overlap_chunks)
        tp, rank = group_size(self.group), group_rank(self.group)
        self.lora_A = _partial_grad(_param(lora.lora_A, None, tp, rank))
        self.lora_B = _param(lora.lora_B, TPShard(0, partition), tp, rank)
        self.scaling, self.lora_dropout = lora.scaling, lora.lora_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel and self.overlap_chunks > 1 and group_size(self.group) > 1:
            # the chunked gather keeps no whole input; the adapter gathers its own (one more all-gather)
            y = gather_linear(x, self.weight, self.bias, self.group, self.overlap_chunks)
            x = gather_sequence(x, self.group)
        else:
            x = gather_sequence(x, self.group) if self.sequence_parallel else copy_to_group(x, self.group)
            y = F.linear(x, self.weight, self.bias)
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling


class RowParallelLoRALinear(RowParallelLinear):
    """RowParallelLinear plus a low-rank update; A holds this rank's input columns."""

    def __init__(self, base: RowParallelLinear, lora: LoRALinear, partition: int):
        super().__init__(base.weight, base.bias, base.group, base.sequence_parallel, base.overlap_chunks)
        tp, rank = group_size(self.group), group_rank(self.group)
        self.lora_A = _param(lora.lora_A, TPShard(1, partition), tp, rank)
        self.lora_B = _partial_grad(_param(lora.lora_B, None, tp, rank))
        self.scaling, self.lora_dropout = lora.scaling, lora.lora_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling
        if self.sequence_parallel and self.overlap_chunks > 1 and group_size(self.group) > 1:
            y = linear_reduce_scatter(x, self.weight, self.group, self.overlap_chunks) + \
                reduce_scatter_sequence(update, self.group)
        else:
            y = F.linear(x, self.weight) + update
            y = reduce_scatter_sequence(y, self.group) if self.sequence_parallel else reduce_from_group(y, self.group)
        return y if self.bias is None else y + self.bias


def with_lora(parallel: ColumnParallelLinear | RowParallelLinear, plain: torch.nn.Module, partition: int):
    """The tensor-parallel module for `plain`: `parallel` itself, or its LoRA version when `plain` is a
    LoRALinear (its adapters split to match)."""
    if not isinstance(plain, LoRALinear):
        return parallel
    if isinstance(parallel, ColumnParallelLinear):
        return ColumnParallelLoRALinear(parallel, plain, partition)
    return RowParallelLoRALinear(parallel, plain, partition)
