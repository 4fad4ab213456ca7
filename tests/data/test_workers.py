"""Worker processes decode and process samples ahead of the packer without changing a bit of
the batches, the skip report, or where a resumed run continues; a worker that dies is an error
that says so, not a hang."""

import multiprocessing
import os
import signal

import pytest

from mmfuse.data.config import DataConfig
from mmfuse.data.dataset import MLLMDataset
from mmfuse.data.tokenizer import build_tiny_tokenizer
from mmfuse.data.workers import WorkerDied
from mmfuse.models.qwen2_5_vl.config import SMALL_VOCAB_SPECIAL_TOKENS
from mmfuse.train.batches import TrainBatches
from tests.data.batch_equal import assert_same_batches, take
from tests.data.fakes import FakeProcessor
from tests.data.test_dataset import _write_dataset


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(512, SMALL_VOCAB_SPECIAL_TOKENS, corpus=["What colour is it? Red."])


def _batches(tmp_path, tok, num_workers):
    cfg = DataConfig(dataset=["d.json"], dataset_dir=str(tmp_path), cutoff_len=256, num_workers=num_workers)
    return TrainBatches(MLLMDataset(cfg, tokenizer=tok, processor=FakeProcessor()), seq_length=300, seed=1)


def test_workers_give_the_batches_and_skip_report_of_in_process_loading(tmp_path, tok):
    _write_dataset(tmp_path)
    plain, workers = _batches(tmp_path, tok, 0), _batches(tmp_path, tok, 2)
    want = take(plain, 8)   # several epochs: the bad sample comes round again and is counted once
    assert_same_batches(take(workers, 8), want)
    assert workers.report.to_dict() == plain.report.to_dict()
    assert dict(workers.report.counts) == {"missing_file": 1, "unreadable_image": 1}
    assert not multiprocessing.active_children()   # the pool was shut down with the stream


def test_resumed_run_with_workers_continues_identically(tmp_path, tok):
    _write_dataset(tmp_path)
    want = take(_batches(tmp_path, tok, 0), 7)
    first = _batches(tmp_path, tok, 2)
    head = take(first, 3)
    resumed = _batches(tmp_path, tok, 2)
    resumed.load_state_dict(first.state_dict())
    assert_same_batches(head + take(resumed, 4), want)


def test_a_killed_worker_is_a_clear_error_not_a_hang(tmp_path, tok):
    _write_dataset(tmp_path)
    stream = iter(_batches(tmp_path, tok, 1))
    next(stream)
    workers = multiprocessing.active_children()     # the pool's one spawned worker
    assert len(workers) == 1
    os.kill(workers[0].pid, signal.SIGKILL)         # what the OOM killer does
    with pytest.raises(WorkerDied, match="data worker process died while preparing sample .*num_workers"):
        for _ in range(50):                          # results finished before the kill may still arrive
            next(stream)
    stream.close()
    assert not multiprocessing.active_children()    # the broken pool was shut down with the stream
