"""Which sample each data-parallel rank reads next: a seeded shuffle per epoch, split across DP
ranks, endless over epochs, with a state (epoch, position) that resumes to the identical sequence."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class ShardedSampler:
    """Indices into a dataset of `num_samples` for one DP rank. Each epoch the whole index range
    is permuted with (seed, epoch) and rank r takes positions r, r + dp_size, ...: the ranks' shards
    are disjoint and together cover every sample once per epoch. Iteration continues into the next
    epoch (or stops after `num_epochs`), so ranks with one sample more or less never wait for each
    other at an epoch boundary."""

    def __init__(self, num_samples: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = None):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} must be in [0, dp_size={dp_size})")
        if num_samples < dp_size:
            raise ValueError(f"{num_samples} usable samples cannot feed {dp_size} data-parallel ranks "
                             f"(each rank needs at least one)")
        self.num_samples = num_samples
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.epoch = 0        # epoch of the next index
        self.position = 0     # indices of this epoch's shard already handed out

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's indices for `epoch`, in reading order."""
        if self.shuffle:
            # [seed, epoch] as entropy: no collision between (seed, epoch + 1) and (seed + 1, epoch).
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        return order[self.dp_rank::self.dp_size]

    def __iter__(self) -> Iterator[int]:
        while self.num_epochs is None or self.epoch < self.num_epochs:
            shard = self.shard(self.epoch)
            while self.position < len(shard):
                index = int(shard[self.position])
                self.position += 1    # before yielding: state_dict() then counts this index as read
                yield index
            self.epoch += 1
            self.position = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "num_samples": self.num_samples, "dp_rank": self.dp_rank, "dp_size": self.dp_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved state; the data and the DP layout must be the ones it was saved with."""
        for key in ("seed", "shuffle", "num_samples", "dp_rank", "dp_size"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"sampler state was saved with {key}={state.get(key)!r} but this run has "
                                 f"{key}={getattr(self, key)!r}; resuming would not continue the same sequence")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
