"""comm_trace's reading of a profiler trace: on synthetic event lists, communication the main thread
waited for is exposed, communication beside its ops is hidden, Python gaps and a late peer's time are
not counted; on a real two-rank gloo trace the collective names it looks for are the ones torch records."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.parallel import comm_trace  # noqa: E402

MAIN, GLOO = 1, 2


def op(name, ts, dur, tid=MAIN, cat="cpu_op"):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "tid": tid, "cat": cat}


def annotation(name, ts, dur, tid=MAIN):
    return op(name, ts, dur, tid, cat="user_annotation")


def step_with_one_all_reduce():
    """0-100 us step: compute 0-40, hand the all-reduce to gloo 40-42, compute 42-70, wait 70-90
    (gloo runs 42-90), compute 90-100."""
    return [annotation("step", 0, 100),
            op("aten::linear", 0, 40), op("aten::addmm", 1, 38),
            op("c10d::allreduce_", 40, 2),
            op("aten::mm", 42, 28),
            annotation("gloo:all_reduce", 42, 48, tid=GLOO),
            op("aten::add", 90, 10)]


def test_waited_communication_is_exposed_and_communication_beside_ops_is_hidden():
    s = comm_trace.analyse(step_with_one_all_reduce())
    assert s.window_ms == pytest.approx(0.100)
    assert s.comm_ms == pytest.approx(0.050)        # 40-90
    assert s.exposed_ms == pytest.approx(0.022)     # the call 40-42 + the wait 70-90
    assert s.wait_ms == pytest.approx(0.020)
    assert s.hidden_share == pytest.approx(1 - 22 / 50)
    assert s.collectives == {"c10d::allreduce_": 1, "gloo:all_reduce": 1}


def test_python_gap_in_which_no_collective_completes_is_not_exposed():
    events = step_with_one_all_reduce()
    events[4] = op("aten::mm", 42, 10)               # 52-60: Python between ops, gloo still running
    events.append(op("aten::mm", 60, 10))
    s = comm_trace.analyse(events)
    assert s.exposed_ms == pytest.approx(0.022)


def test_wait_inside_an_enclosing_op_is_found_from_its_leaves():
    """A backward node (one op) that computes 42-70 and then waits for its collective until 90."""
    events = step_with_one_all_reduce()
    events[4] = op("autograd::engine::evaluate_function: GatherLinearBackward", 42, 48)
    events.append(op("aten::mm", 42, 28))
    assert comm_trace.analyse(events).exposed_ms == pytest.approx(0.022)


def test_ops_the_collective_call_runs_count_as_communication_not_compute():
    """Gloo's reduce-scatter clones its input on the caller's thread, inside the c10d call."""
    events = [annotation("step", 0, 100), op("c10d::_reduce_scatter_base_", 10, 30), op("aten::clone", 11, 28),
              annotation("gloo:all_reduce", 40, 20, tid=GLOO), op("aten::mm", 60, 40)]
    s = comm_trace.analyse(events)
    assert s.comm_ms == pytest.approx(0.050) and s.exposed_ms == pytest.approx(0.050)
    assert s.hidden_share == pytest.approx(0.0)


def test_barriers_and_events_outside_the_window_are_ignored():
    events = step_with_one_all_reduce() + [annotation("gloo:barrier", 0, 100, tid=GLOO),
                                           annotation("gloo:all_reduce", 120, 30, tid=GLOO),
                                           op("c10d::allreduce_", 110, 5)]
    s = comm_trace.analyse(events)
    assert s.comm_ms == pytest.approx(0.050) and s.exposed_ms == pytest.approx(0.022)


def test_time_waiting_for_a_late_peer_is_not_communication():
    """Rank 0 enters the all-reduce at 10 and waits; rank 1 enters at 40; both finish at 50."""
    def rank(start):
        return [annotation("step", 0, 60), op("aten::mm", 0, start), op("c10d::allreduce_", start, 0),
                annotation("gloo:all_reduce", start, 50 - start, tid=GLOO), op("aten::add", 50, 10)]

    early, late = comm_trace.analyse_ranks([rank(10), rank(40)])
    assert early.aligned and early.comm_ms == pytest.approx(0.010) and early.exposed_ms == pytest.approx(0.010)
    assert early.peer_wait_ms == pytest.approx(0.030) and early.wait_ms == pytest.approx(0.040)
    assert late.comm_ms == pytest.approx(0.010) and late.peer_wait_ms == pytest.approx(0.0)
    assert comm_trace.analyse(rank(10)).comm_ms == pytest.approx(0.040)   # one rank alone: not aligned


def test_ranks_with_different_collectives_are_left_unaligned():
    a = step_with_one_all_reduce()
    b = a + [annotation("gloo:all_gather", 91, 2, tid=GLOO)]
    assert not any(s.aligned for s in comm_trace.analyse_ranks([a, b]))


def _blocking_all_reduce(rank, world, out_dir):
    import torch
    import torch.distributed as dist

    x = torch.ones(1 << 20)
    return comm_trace.trace_step(lambda: dist.all_reduce(x), Path(out_dir) / f"rank{rank}.json")


def test_real_gloo_trace_names_are_recognised_and_a_blocking_all_reduce_is_exposed(tmp_path):
    from tests.parallel.spawn import run_ranks

    paths = run_ranks(2, _blocking_all_reduce, str(tmp_path))
    for s in comm_trace.analyse_files(paths):
        assert s["aligned"]
        assert s["collectives"] == {"c10d::allreduce_": 1, "gloo:all_reduce": 1}
        assert s["comm_ms"] > 0 and s["hidden_share"] < 0.2
