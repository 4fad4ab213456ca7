"""Run a function on N spawned CPU ranks joined by gloo, and collect what each rank returns.

    results = run_ranks(2, _my_rank_fn, arg1, arg2)   # [result of rank 0, result of rank 1]

`fn(rank, world_size, *args)` must be a module-level function (the rank imports it by name). It runs
with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set and the default process group already initialised
(gloo, `timeout_s`); whatever it returns (tensors, numbers, lists, dicts) comes back through
torch.save/torch.load(weights_only=True). Any rank raising fails the call with that rank's traceback.

Ranks are forked from a multiprocessing fork server that imports torch and mmfuse once per test
session (PRELOAD), not spawned as fresh interpreters: a spawned pair of ranks spent about 5 s importing
before doing anything on the 2-core CI machine, a forked pair starts in 0.15 s, and the test suite
starts ranks a hundred times. The fork server is its own fresh interpreter (nothing of pytest's
process is forked), and nothing it imports starts a thread. A forked rank would inherit the server's
environment, so each rank gets the caller's os.environ (and cwd and sys.path, as spawn gives them).
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import traceback
from multiprocessing import forkserver
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Imported once by the fork server; ranks fork from it with these already loaded. torch._dynamo is
# imported by the first torch.optim optimizer a rank builds (3.6 s here), and it imports triton, which
# decides at import whether its language runs interpreted: the server starts with TRITON_INTERPRET=1
# (unless the caller set it), the ranks' default.
PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "mmfuse", "mmfuse.ops", "mmfuse.parallel",
           "mmfuse.models.qwen2_5_vl", "mmfuse.train", "tests.parallel.spawn"]


def _ensure_fork_server() -> None:
    mp.get_context("forkserver").set_forkserver_preload(PRELOAD)
    before = os.environ.get("TRITON_INTERPRET")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        forkserver.ensure_running()  # started once; later calls return at once
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]


def _entry(rank: int, world_size: int, port: int, out_dir: str, timeout_s: float, init: bool, env: dict,
           fn, args) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        if init:
            dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        result = fn(rank, world_size, *args)
        torch.save({"result": result}, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world_size: int, fn, *args, timeout_s: float = 60.0, init: bool = True) -> list:
    _ensure_fork_server()
    with tempfile.TemporaryDirectory() as out:
        try:
            mp.start_processes(_entry, args=(world_size, free_port(), out, timeout_s, init, dict(os.environ), fn, args),
                               nprocs=world_size, join=True, start_method="forkserver")
        except Exception as e:
            errors = sorted(Path(out).glob("rank*.err"))
            detail = "\n".join(f"--- {p.stem} ---\n{p.read_text()}" for p in errors)
            raise RuntimeError(f"{len(errors)} of {world_size} ranks failed:\n{detail}") from e
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=True)["result"] for r in range(world_size)]
