"""Keys and values of the tokens seen so far, for generation: a decoder's self-attention over a prompt
and then one new token per step attends to every earlier token of its own sequence without
recomputing their keys and values.

One `LayerKVCache` per decoder layer holds a [capacity, Hk, d] buffer per sequence of the batch,
grown by doubling. A step appends each sequence's new rows and runs causal varlen attention of the
new queries over the sequence's whole cache: bottom-right causal alignment (the op's convention)
lets the prompt's queries see the prompt causally and a decoded token see everything before it.
The keys reach the op as one packed stream: a view of the buffer for a single sequence, one copy
(the concatenation) for several.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmfuse import ops


class LayerKVCache:
    """One decoder layer's keys and values, per sequence of the batch."""

    def __init__(self, batch: int):
        self._k: list[torch.Tensor | None] = [None] * batch
        self._v: list[torch.Tensor | None] = [None] * batch
        self.lengths: list[int] = [0] * batch

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def _append(self, b: int, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        end = self.lengths[b] + k_new.shape[0]
        buf_k = self._k[b]
        if buf_k is None or buf_k.shape[0] < end:
            cap = max(end, 2 * (0 if buf_k is None else buf_k.shape[0]), 16)
            grown_k = k_new.new_empty((cap, *k_new.shape[1:]))
            grown_v = v_new.new_empty((cap, *v_new.shape[1:]))
            if buf_k is not None:
                grown_k[:self.lengths[b]] = buf_k[:self.lengths[b]]
                grown_v[:self.lengths[b]] = self._v[b][:self.lengths[b]]
            self._k[b], self._v[b] = grown_k, grown_v
        self._k[b][self.lengths[b]:end] = k_new
        self._v[b][self.lengths[b]:end] = v_new
        self.lengths[b] = end

    def attend(self, q_THd: torch.Tensor, k_TKd: torch.Tensor, v_TKd: torch.Tensor,
               cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Append the new keys/values (rows cu_seqlens[b]:cu_seqlens[b + 1] belong to sequence b),
        then causal attention of the new queries over each sequence's cache. -> [T, H, d]."""
        cu = cu_seqlens.tolist()
        if len(cu) != self.batch + 1:
            raise ValueError(f"cu_seqlens describes {len(cu) - 1} sequences, the cache holds {self.batch}")
        for b in range(self.batch):
            self._append(b, k_TKd[cu[b]:cu[b + 1]], v_TKd[cu[b]:cu[b + 1]])
        if self.batch == 1:
            k_all, v_all = self._k[0][:self.lengths[0]], self._v[0][:self.lengths[0]]
        else:
            k_all = torch.cat([self._k[b][:n] for b, n in enumerate(self.lengths)])
            v_all = torch.cat([self._v[b][:n] for b, n in enumerate(self.lengths)])
        cu_k = [0]
        for n in self.lengths:
            cu_k.append(cu_k[-1] + n)
        cu_k_t = torch.tensor(cu_k, dtype=torch.int32, device=cu_seqlens.device)
        max_q = max(cu[b + 1] - cu[b] for b in range(self.batch))
        return ops.attention(q_THd, k_all, v_all, cu_seqlens.to(torch.int32), cu_k_t, max_q, max(self.lengths),
                             causal=True)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only the sequences at `rows` (in that order), e.g. when others have finished."""
        self._k = [self._k[i] for i in rows]
        self._v = [self._v[i] for i in rows]
        self.lengths = [self.lengths[i] for i in rows]


class KVCache:
    """The caches of all decoder layers of one batch of sequences."""

    def __init__(self, num_layers: int, batch: int):
        self.layers = [LayerKVCache(batch) for _ in range(num_layers)]

    @property
    def lengths(self) -> list[int]:
        """Tokens cached per sequence."""
        return list(self.layers[0].lengths) if self.layers else []

    def keep(self, rows: Sequence[int]) -> None:
        for layer in self.layers:
            layer.keep(rows)
