"""Sample decoding and processing in worker processes, handed to the packer in exactly the
sampler's order, so packing, resume and the batches' bits are the same as with num_workers = 0.

A copy of the sampler runs ahead of the real one and keeps a bounded window of upcoming indices
in flight; `load(index)` then takes the oldest result and checks it is the index asked for. The
workers only compute (`MLLMDataset.fetch_sample`); what they found (skip reasons, cache events) is
recorded by the main process, so the skip report counts each sample exactly once.

Workers are started with `spawn`, not `fork`: the training process has torch's thread pools
running (and may hold a CUDA context), and a forked child inherits locks held by those threads in
whatever state they were in, which can deadlock it. Spawn costs one interpreter + torch import per
worker (a few seconds, once per pass over the stream). ProcessPoolExecutor rather than
multiprocessing.Pool: a worker killed by the OS (e.g. out of memory) raises BrokenProcessPool
instead of hanging the run; `load` turns it into WorkerDied, which names the sample and the fix.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager

import torch

from mmfuse.data.cache import Fetched, decode, encode
from mmfuse.data.dataset import MLLMDataset
from mmfuse.data.mllm import MLLMSample
from mmfuse.data.packing import ProcessedSample
from mmfuse.data.sampler import ShardedSampler

PREFETCH_PER_WORKER = 4   # samples in flight per worker: keeps workers busy across uneven sample costs

_worker_dataset: MLLMDataset | None = None


def _init_worker(dataset: MLLMDataset) -> None:
    global _worker_dataset
    _worker_dataset = dataset
    # Ctrl-C reaches the whole process group; the main process handles it and shuts the pool down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One intra-op thread per worker: N workers x all-core thread pools would oversubscribe the CPUs.
    torch.set_num_threads(1)


def _fetch(sample: MLLMSample) -> tuple[bytes, str, str]:
    # The sample travels as the cache's safetensors bytes: exact, and no torch shared-memory
    # file handles (torch's default for tensors sent between processes) to run out of.
    fetched = _worker_dataset.fetch_sample(sample)
    return encode(fetched), fetched.cache, fetched.cache_note


def _unpack(result: tuple[bytes, str, str]) -> Fetched:
    data, cache, note = result
    fetched = decode(data)
    fetched.cache, fetched.cache_note = cache, note
    return fetched


class WorkerDied(RuntimeError):
    """A worker process ended without a result (killed by the OS, crashed in native code)."""


class OrderedLoader:
    """`load(index)` for packed_stream, served by `num_workers` processes running ahead of `sampler`."""

    def __init__(self, dataset: MLLMDataset, sampler: ShardedSampler, num_workers: int):
        self.dataset = dataset
        ahead = ShardedSampler(sampler.num_samples, sampler.dp_rank, sampler.dp_size, seed=sampler.seed,
                               shuffle=sampler.shuffle, num_epochs=sampler.num_epochs)
        ahead.load_state_dict(sampler.state_dict())
        self._upcoming = iter(ahead)
        self._workers = num_workers
        self._window = num_workers * PREFETCH_PER_WORKER
        self._pending: deque[tuple[int, Future | None]] = deque()
        self._pool = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_init_worker, initargs=(dataset.for_worker(),))

    def _fill(self) -> None:
        while len(self._pending) < self._window:
            index = next(self._upcoming, None)
            if index is None:   # a sampler with num_epochs has an end
                return
            # Known-bad samples are not sent out again (their skip is already counted).
            future = None if index in self.dataset._bad else self._pool.submit(_fetch, self.dataset.samples[index])
            self._pending.append((index, future))

    def load(self, index: int) -> ProcessedSample | None:
        try:
            return self._load(index)
        except BrokenProcessPool as exc:
            raise WorkerDied(f"a data worker process died while preparing sample {index} "
                             f"({self.dataset.samples[index].where}); the operating system ends a worker "
                             f"this way when it runs out of memory (see `dmesg`). Fewer workers "
                             f"(data.num_workers, now {self._workers}) or smaller image_max_pixels use "
                             f"less; num_workers: 0 decodes in the training process. Resume with "
                             f"--resume.") from exc

    def _load(self, index: int) -> ProcessedSample | None:
        self._fill()
        if not self._pending:
            raise RuntimeError(f"sample {index} requested after the prefetching sampler ended")
        expected, future = self._pending.popleft()
        if expected != index:
            raise RuntimeError(f"sampler asked for sample {index} but the workers were prefetching {expected}: "
                               f"the sampler was changed while a stream was being read")
        if future is None:
            return None
        return self.dataset.record(index, _unpack(future.result()))

    def close(self) -> None:
        # cancel_futures drops queued work; wait=True joins the workers so no process outlives the stream.
        self._pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def sample_loader(dataset: MLLMDataset, sampler: ShardedSampler, num_workers: int
                  ) -> Iterator[Callable[[int], ProcessedSample | None]]:
    """The `load` function for packed_stream: in-process for num_workers = 0, else an OrderedLoader
    that starts from the sampler's current position and is shut down when the block exits (also on
    an exception, KeyboardInterrupt, or a generator closed early)."""
    if num_workers <= 0:
        yield dataset.load
        return
    loader = OrderedLoader(dataset, sampler, num_workers)
    try:
        yield loader.load
    finally:
        loader.close()
