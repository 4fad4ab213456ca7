"""How much of a step's communication the main thread waited for, from a torch.profiler trace.

With gloo on CPU the profiler records (checked on torch 2.13, CPU activities only):

  main thread   c10d::allreduce_, c10d::_allgather_base_, c10d::_reduce_scatter_base_, ...  (cpu_op)
                the call that hands the collective to gloo: ~50-150 us, or longer where gloo works on
                the caller's thread (reduce-scatter clones its input there). Work.wait() records nothing.
  gloo threads  gloo:all_reduce, gloo:all_gather, ... (user_annotation), the collective running,
                including the wait for the slowest peer. Gloo reduce-scatter shows as gloo:all_reduce.

So the analysis works on intervals, in the step's window (a record_function range on the main thread):

  communication   union of the collective spans on every thread (c10d calls and gloo spans); given
                  every rank's trace (analyse_ranks), a gloo span counts from when the last rank
                  started that collective: before, the rank waits for a late peer (imbalance, not
                  communication; reported as peer_wait_ms)
  compute         union of the main thread's leaf ops (ops with no op inside), less the c10d calls
  wait gaps       stretches of the window with neither compute nor a c10d call in which some
                  collective completes: the main thread was blocked in wait() (or a blocking
                  collective) and resumed when it finished. Gaps in which nothing completes are Python
                  between ops and are not counted.
  exposed         the c10d calls + the communication inside wait gaps
  hidden share    1 - exposed / communication

A short Python gap in which a collective happens to complete counts as waiting; it adds at most that
gap's length. Wake-up latency after a collective ends is in wait_ms but not in exposed_ms.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import asdict, dataclass
from pathlib import Path

Intervals = list[tuple[float, float]]   # sorted, disjoint [start, end) in microseconds

COMM_PREFIXES = ("c10d::", "gloo:", "nccl:")
COMM_NAMES = ("record_param_comms",)
SYNC_ONLY = ("barrier",)   # a barrier moves no data; the bench's own barriers sit outside the window anyway


@dataclass
class CommSummary:
    """Communication of one traced step on one rank (milliseconds)."""
    window_ms: float         # the step window's length
    comm_ms: float           # wall time with some collective in flight (union over threads)
    exposed_ms: float        # communication the main thread waited for or ran itself
    hidden_share: float      # 1 - exposed / comm (1.0 when there is no communication)
    wait_ms: float           # main thread blocked in waits, wake-up latency and peer wait included
    peer_wait_ms: float      # part of wait_ms before the last rank joined the collective (imbalance)
    aligned: bool            # collective spans start when the last rank joined (traces of all ranks given)
    collectives: dict[str, int]   # events per name inside the window


def is_comm(name: str) -> bool:
    return (name.startswith(COMM_PREFIXES) or name in COMM_NAMES) and not any(s in name for s in SYNC_ONLY)


def union(spans) -> Intervals:
    out: Intervals = []
    for a, b in sorted(s for s in spans if s[1] > s[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def length(iv: Intervals) -> float:
    return sum(b - a for a, b in iv)


def intersect(x: Intervals, y: Intervals) -> Intervals:
    out, i, j = [], 0, 0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if b > a:
            out.append((a, b))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(x: Intervals, y: Intervals) -> Intervals:
    out, j = [], 0
    for a, b in x:
        while j < len(y) and y[j][1] <= a:
            j += 1
        k, start = j, a
        while k < len(y) and y[k][0] < b:
            if y[k][0] > start:
                out.append((start, y[k][0]))
            start = max(start, y[k][1])
            k += 1
        if start < b:
            out.append((start, b))
    return out


def _span(e: dict) -> tuple[float, float]:
    return float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))


def _leaves(ops: list[dict]) -> list[dict]:
    """Ops of one thread that contain no other op (an op nests inside the one enclosing its start)."""
    ops = sorted(ops, key=lambda e: (float(e["ts"]), -float(e.get("dur", 0))))
    has_child, stack = set(), []
    for i, e in enumerate(ops):
        a, b = _span(e)
        while stack and _span(ops[stack[-1]])[1] <= a:
            stack.pop()
        if stack:
            has_child.add(stack[-1])
        stack.append(i)
    return [e for i, e in enumerate(ops) if i not in has_child]


@dataclass
class _Parts:
    main: object                    # the main thread's tid
    win: Intervals                  # the step window(s)
    calls: Intervals                # c10d calls on the main thread
    spans: list[tuple[str, float, float]]   # collectives on other threads, by start
    names: dict[str, int]


def _parts(events: list[dict], window: str) -> _Parts:
    xs = [e for e in events if e.get("ph", "X") == "X" and "ts" in e]
    wins = [e for e in xs if e["name"] == window]
    if not wins:
        raise ValueError(f"no '{window}' range in the trace")
    main = wins[0]["tid"]
    win = union(_span(e) for e in wins if e["tid"] == main)
    comm = [e for e in xs if is_comm(e["name"]) and intersect([_span(e)], win)]
    names: dict[str, int] = {}
    for e in comm:
        names[e["name"]] = names.get(e["name"], 0) + 1
    return _Parts(main, win, union(_span(e) for e in comm if e["tid"] == main),
                  sorted(((e["name"],) + _span(e) for e in comm if e["tid"] != main), key=lambda s: s[1]),
                  dict(sorted(names.items())))


def analyse(events: list[dict], window: str = "step", joined: list[float] | None = None) -> CommSummary:
    """Communication, exposed part and hidden share inside every `window` range of a Chrome-trace
    event list (complete 'X' events with name, ts, dur, tid; ops have cat 'cpu_op').
    joined[k]: when the last rank started the k-th collective of the other threads (in start order);
    its span is counted from then (time before it is the peer's lateness, not communication)."""
    p = _parts(events, window)
    xs = [e for e in events if e.get("ph", "X") == "X" and "ts" in e]
    ops = [e for e in xs if e["tid"] == p.main and e.get("cat") == "cpu_op" and not is_comm(e["name"])]
    compute = subtract(union(_span(e) for e in _leaves(ops)), p.calls)
    gaps = subtract(subtract(p.win, compute), p.calls)
    ends = sorted(b for _, _, b in p.spans)
    waits = [g for g in gaps if (k := bisect.bisect_right(ends, g[0])) < len(ends) and ends[k] <= g[1]]
    raw = union((a, b) for _, a, b in p.spans)
    if joined is not None:
        if len(joined) != len(p.spans):
            raise ValueError(f"{len(joined)} join times for {len(p.spans)} collectives")
        bg = union((min(max(a, j), b), b) for (_, a, b), j in zip(p.spans, joined))
    else:
        bg = raw
    total = length(intersect(union(p.calls + bg), p.win))
    exposed = length(intersect(p.calls, p.win)) + length(intersect(waits, bg))
    peer_wait = length(intersect(waits, raw)) - length(intersect(waits, bg))
    return CommSummary(window_ms=length(p.win) / 1e3, comm_ms=total / 1e3, exposed_ms=exposed / 1e3,
                       hidden_share=1 - exposed / total if total > 0 else 1.0, wait_ms=length(waits) / 1e3,
                       peer_wait_ms=peer_wait / 1e3, aligned=joined is not None, collectives=p.names)


def analyse_ranks(traces: list[list[dict]], window: str = "step") -> list[CommSummary]:
    """analyse() of every rank's trace of the same step(s), the k-th collective of each rank
    matched with the k-th of the others (same names in the same order: ranks issue collectives in
    one order) and counted from the latest start. The ranks' clocks must agree (one machine, or
    synchronised). Collectives that do not match (another group's, a rank-dependent schedule) leave
    the spans unaligned."""
    spans = [_parts(t, window).spans for t in traces]
    same = all([n for n, _, _ in s] == [n for n, _, _ in spans[0]] for s in spans)
    joined = [max(s[k][1] for s in spans) for k in range(len(spans[0]))] if same else None
    return [analyse(t, window, joined) for t in traces]


def read_trace(path: str | Path) -> list[dict]:
    return json.loads(Path(path).read_text())["traceEvents"]


def analyse_files(paths: list[str | Path], window: str = "step") -> list[dict]:
    """analyse_ranks() of the exported Chrome traces of every rank, as dicts (for a result JSON)."""
    out = analyse_ranks([read_trace(p) for p in paths], window)
    return [dict(asdict(s), trace=str(p), trace_mb=round(Path(p).stat().st_size / 2 ** 20, 2))
            for s, p in zip(out, paths)]


def trace_step(step, path: str | Path, group=None, steps: int = 1) -> str:
    """Run step() `steps` times under torch.profiler (CPU activities), each inside a 'step' range
    after a barrier of `group` (outside the range) so the ranks start together; write the Chrome
    trace to `path` (analyse_files reads it once every rank has written its own) and return the path."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile, record_function

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            dist.barrier(group)
            with record_function("step"):
                step()
    prof.export_chrome_trace(str(path))
    return str(path)


def print_table(traces: dict[str, dict[str, list[dict]]], title: str) -> None:
    """traces[size][mode] = [summary of rank 0, rank 1, ...] as trace_step returns them."""
    print(title)
    print(f"{'size':6} {'mode':>11} {'rank':>4} {'step ms':>9} {'comm ms':>9} {'exposed ms':>10} {'hidden':>7} "
          f"{'collectives':>11}")
    for size, modes in traces.items():
        for mode, ranks in modes.items():
            for r, t in enumerate(ranks):
                n = sum(c for name, c in t["collectives"].items() if not name.startswith("c10d::"))
                print(f"{size:6} {mode:>11} {r:4d} {t['window_ms']:9.1f} {t['comm_ms']:9.1f} {t['exposed_ms']:10.1f} "
                      f"{100 * t['hidden_share']:6.0f}% {n:11d}")
