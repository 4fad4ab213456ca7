"""Keys and values of the tokens seen so far, for generation: a decoder's self-attention over a prompt
and then one new token per step attends to every earlier token of its own sequence without
recomputing their keys and values.

One `LayerKVCache` per decoder layer holds a [batch, capacity, Hk, d] buffer, grown by doubling. A
step writes each sequence's new rows after its cached ones and runs causal varlen attention of the new
queries over each sequence's whole cache: bottom-right causal alignment (the op's convention) lets the
prompt's queries see the prompt causally and a decoded token see everything before it. The buffer
reaches the op as one packed stream without a copy: sequence b is rows [b * capacity, b * capacity +
length_b), and the unused rest of its row is described as a sequence with no query rows, which the op
skips. (Concatenating the caches instead copied all of them in every layer at every step: for 8
sequences of 1000 tokens, 16 MB per layer and step with Hk 2, d 128.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmfuse import ops


class LayerKVCache:
    """One decoder layer's keys and values, per sequence of the batch."""

    def __init__(self, batch: int):
        self._k: torch.Tensor | None = None   # [batch, capacity, Hk, d]
        self._v: torch.Tensor | None = None
        self.lengths: list[int] = [0] * batch

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def _reserve(self, need: int, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        cap = 0 if self._k is None else self._k.shape[1]
        if need <= cap:
            return
        grown = max(need, 2 * cap, 16)
        k = k_new.new_empty((self.batch, grown, *k_new.shape[1:]))
        v = v_new.new_empty((self.batch, grown, *v_new.shape[1:]))
        if self._k is not None:
            used = max(self.lengths)
            k[:, :used] = self._k[:, :used]
            v[:, :used] = self._v[:, :used]
        self._k, self._v = k, v

    def attend(self, q_THd: torch.Tensor, k_TKd: torch.Tensor, v_TKd: torch.Tensor,
               cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Append the new keys/values (rows cu_seqlens[b]:cu_seqlens[b + 1] belong to sequence b),
        then causal attention of the new queries over each sequence's cache. -> [T, H, d]."""
        cu = cu_seqlens.tolist()
        if len(cu) != self.batch + 1:
            raise ValueError(f"cu_seqlens describes {len(cu) - 1} sequences, the cache holds {self.batch}")
        new = [cu[b + 1] - cu[b] for b in range(self.batch)]
        ends = [n0 + n for n0, n in zip(self.lengths, new)]
        self._reserve(max(ends), k_TKd, v_TKd)
        if all(n == 1 for n in new):     # a decoding step: one scattered write per tensor
            rows = torch.arange(self.batch, device=k_TKd.device)
            at = torch.tensor(self.lengths, device=k_TKd.device)
            self._k[rows, at] = k_TKd
            self._v[rows, at] = v_TKd
        else:
            for b in range(self.batch):
                self._k[b, self.lengths[b]:ends[b]] = k_TKd[cu[b]:cu[b + 1]]
                self._v[b, self.lengths[b]:ends[b]] = v_TKd[cu[b]:cu[b + 1]]
        self.lengths = ends
        cap = self._k.shape[1]
        if self.batch == 1:
            k_all, v_all = self._k[0, :ends[0]], self._v[0, :ends[0]]
            cu_q, cu_k = cu, [0, ends[0]]
        else:   # sequence b, then the rest of its buffer row as a sequence without queries
            k_all, v_all = self._k.flatten(0, 1), self._v.flatten(0, 1)
            cu_q, cu_k = [0], [0]
            for b in range(self.batch):
                cu_q += [cu[b + 1], cu[b + 1]]
                cu_k += [b * cap + ends[b], (b + 1) * cap]
        device = cu_seqlens.device
        return ops.attention(q_THd, k_all, v_all, torch.tensor(cu_q, dtype=torch.int32, device=device),
                             torch.tensor(cu_k, dtype=torch.int32, device=device), max(new),
                             max(b - a for a, b in zip(cu_k, cu_k[1:])), causal=True)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only the sequences at `rows` (in that order), e.g. when others have finished."""
        if self._k is not None:
            index = torch.tensor(list(rows), device=self._k.device)
            self._k, self._v = self._k[index], self._v[index]
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
